"""Suites end to end with stand-in image sources: a "perfect model" that renders exactly what the prompt
asks (ground truth), and a "wrong model" that draws other identities. Scores must separate them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loraclr.evaluate import concepts as C
from loraclr.evaluate import run_suite, to_markdown
from loraclr.evaluate.base import to_tensor
from loraclr.evaluate.suites import Scorer, multi_prompts, single_prompts
from loraclr.evaluate.world import ASSETS, load_world_evaluator
from loraclr.world import scenes as S

needs_weights = pytest.mark.skipif(not (ASSETS / "evaluators.json").is_file(),
                                   reason="evaluator weights not built (scripts/train_evaluators.py)")
BG = {"at the beach": "beach", "in a forest": "forest", "in the snow": "snow", "in the city": "city",
      "at night": "night", "in a room": "room"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("concepts") / "manifest.json"
    data = {"base": "mini", "concepts": [
        {"name": n, "kind": "identity", "identity": n, "style": None, "trigger": f"zq{n}", "file": f"{n}.safetensors",
         "format": "kohya"} for n in ("rubo", "rika", "tavi")] + [
        {"name": "mos", "kind": "style", "identity": None, "style": "mosaic", "trigger": "zqmos",
         "file": "mos.safetensors", "format": "kohya"}]}
    path.write_text(json.dumps(data))
    return path


class RenderSource:
    """Renders the prompt's concepts in their slots (``wrong``: other identities in their place)."""

    def __init__(self, specs, wrong: bool = False):
        self.name = "wrong" if wrong else "perfect"
        self.specs, self.wrong = specs, wrong

    def trigger(self, spec):
        return spec.trigger

    def __call__(self, prompt, seeds):
        found = sorted((prompt.index(s.trigger), s) for s in self.specs if s.trigger in prompt)
        bg = next(v for k, v in BG.items() if k in prompt)
        idents = [S.concept(s.identity) for _, s in found if s.kind == "identity"]
        style = next((s.style for _, s in found if s.kind == "style"), "none")
        out = []
        for sd in seeds:
            rng = np.random.default_rng(sd + 17)
            people = [S.sample_base_identity(rng) if self.wrong or not idents else i
                      for i in (idents or [None])]
            slots = ("middle",) if len(people) == 1 else ("left", "right") if len(people) == 2 else \
                ("left", "middle", "right")
            scene = S.Scene(tuple(S.Character(p, s) for p, s in zip(people, slots, strict=True)), bg, style)
            out.append(S.render(scene, seed=sd).image)
        return to_tensor(out)


def test_manifest_descriptions_and_prompts(manifest):
    specs = C.load_manifest(manifest)
    assert specs[0].description == S.caption_identity(S.CONCEPTS["rubo"])
    assert specs[3].description == "as a mosaic"
    assert specs[0].prompt_phrase() == "a zqrubo creature"  # as train-lora captions it
    assert specs[0].prompt_phrase("<r1> <r2>") == "a <r1> <r2> creature"
    assert specs[3].prompt_phrase() == "as a zqmos"
    p = single_prompts(specs[0], 3)
    words = {"rubo": specs[0].prompt_phrase()}
    assert [x.fill(words) for x in p] == ["a zqrubo creature at the beach", "a zqrubo creature in a forest",
                                          "a zqrubo creature in the snow"]
    multi = multi_prompts(specs, 3, 1, seed=0)
    assert len(multi) == 4 and {len(m.concepts) for m in multi} == {2, 3}
    assert all(set(m.concepts) <= {"rubo", "rika", "tavi"} for m in multi)  # the style is not a character
    three = next(m for m in multi if len(m.concepts) == 3)
    assert three.slots == ("left", "middle", "right") and " in the middle and " in three.template
    with pytest.raises(ValueError, match="unknown concepts"):
        C.select(specs, ["nobody"])


@needs_weights
def test_suites_separate_a_perfect_model_from_a_wrong_one(manifest, tmp_path):
    torch.set_num_threads(1)
    specs = C.load_manifest(manifest)
    ev = load_world_evaluator()
    scorer = Scorer(ev, specs)
    kw = dict(n_prompts=2, seeds=2, n_pairs=3, n_triples=1, scorer=scorer, progress=False)
    good = [run_suite(RenderSource(specs), specs, ev, s, **kw) for s in ("single", "multi")]
    bad = [run_suite(RenderSource(specs, wrong=True), specs, ev, s, **kw) for s in ("single", "multi")]
    for g, b in zip(good, bad, strict=True):
        assert g["overall"]["identity"]["mean"] >= 0.85, g["suite"]
        assert b["overall"]["identity"]["mean"] <= 0.2, b["suite"]
        assert g["overall"]["text"]["mean"] > b["overall"]["text"]["mean"]
        assert g["overall"]["image"]["mean"] > b["overall"]["image"]["mean"]
    # the distance behind each verdict: recognised images lie within the threshold; the true identity is nearer
    # on the perfect model than on the wrong one; concepts without identity have none
    thr = ev.identity.threshold
    for res in good + bad:
        for r in res["images"]:
            for ok, d in zip(r["identity"], r["identity_distance"], strict=True):
                assert (ok is None) == (d is None)
                if ok:
                    assert d < thr

    def mean_distance(res):
        return np.mean([d for r in res["images"] for d in r["identity_distance"] if d is not None])

    assert mean_distance(good[0]) < thr < mean_distance(bad[0])
    # the style concept has text / image alignment but no identity alignment
    assert good[0]["per_concept"]["mos"]["identity"] is None
    assert good[0]["per_concept"]["mos"]["image"]["n"] == 4
    assert good[0]["images"][0]["scored_text"] == S.caption_identity(S.CONCEPTS["rubo"]) + " at the beach"
    assert len(good[1]["images"]) == 4 * 2 and "all_identities" in good[1]["overall"]
    table = to_markdown(good)
    assert "| rubo |" in table and "multi-concept suite" in table
    json.dumps(good)  # results are plain JSON


class RegionalRenderSource(RenderSource):
    """Records the regional plans it is given; ``swap``: draws the characters in reversed slots."""

    def __init__(self, specs, swap: bool = False):
        super().__init__(specs)
        self.swap, self.calls = swap, []

    def __call__(self, prompt, seeds, regions=None, concepts=()):
        self.calls.append((prompt, regions, concepts))
        if self.swap:
            by = {s.name: s for s in self.specs}
            a, b = (by[c].trigger for c in concepts[:2])
            prompt = prompt.replace(a, "\0").replace(b, a).replace("\0", b)
        return super().__call__(prompt, seeds)


def test_regional_multi_suite_binds_each_concept_to_its_scoring_region(manifest):
    from loraclr.evaluate import regions as R

    torch.set_num_threads(1)
    specs = C.load_manifest(manifest)
    ev = load_world_evaluator()
    src = RegionalRenderSource(specs)
    res = run_suite(src, specs, ev, "multi", regions="attention", region_start=0.3, n_pairs=2, n_triples=1,
                    seeds=1, progress=False)
    assert res["settings"]["regions"] == "attention" and res["settings"]["region_start"] == 0.3
    triggers = {s.name: s.trigger for s in specs}
    for prompt, plan, concepts in src.calls:
        n = len(concepts)
        assert plan.mode == "attention" and plan.start == 0.3
        assert [r.box for r in plan.regions] == [R.region(n, slot) for slot in R.slots_for(n)]
        for region, c in zip(plan.regions, concepts, strict=True):
            assert triggers[c] in region.prompt and triggers[c] in prompt
            assert not any(triggers[o] in region.prompt for o in concepts if o != c)
    assert "Regions: attention mode, from 30% of the steps" in to_markdown(res)
    with pytest.raises(ValueError, match="multi-concept suite only"):
        run_suite(src, specs, ev, "single", regions="noise", progress=False)


def test_leakage_counts_characters_drawn_in_each_others_place(manifest):
    torch.set_num_threads(1)
    specs = C.load_manifest(manifest)
    ev = load_world_evaluator()
    kw = dict(n_pairs=3, n_triples=0, seeds=2, progress=False)
    right = run_suite(RegionalRenderSource(specs), specs, ev, "multi", regions="noise", **kw)["overall"]
    swapped = run_suite(RegionalRenderSource(specs, swap=True), specs, ev, "multi", regions="noise", **kw)["overall"]
    assert right["leakage"]["mean"] <= 0.1 and right["identity"]["mean"] >= 0.85
    assert swapped["leakage"]["mean"] >= 0.7 and swapped["identity"]["mean"] <= 0.2
