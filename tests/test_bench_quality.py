"""bench/quality.py end to end on a tiny world (tiny base, two 2-step LoRAs, the world's evaluators): the files,
a row per method and N, numbers in range, and the algebra it relies on: merging one LoRA by the sum IS that
LoRA, so its images score exactly as the own-LoRA reference's; the layer ablation's text-encoder-only merge
has the naive sum's UNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

CONCEPTS = ("rubo", "tavi")


@pytest.fixture(scope="module")
def bench(script):
    return script("bench/quality.py", "bench_quality")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny base folder, manifest of two kohya LoRAs trained for 2 steps with non-zero up factors)."""
    from loraclr.pipeline import family_of, load_base
    from loraclr.training import TrainConfig, save_trained, train_lora
    from loraclr.training import data as D
    from loraclr.world.model import build_text_and_unet, build_vae, save_pipeline_folder

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quality-world")
    base = root / "tiny-sd"
    te, unet = build_text_and_unet("tiny", seed=0)
    save_pipeline_folder(build_vae("tiny", seed=0), te, unet, base, state={"step": 3, "total_steps": 10})
    pipe = load_base(str(base))
    avoid = D.caption_vocabulary_ids(pipe.tokenizer)
    entries = []
    for name in CONCEPTS:
        trigger = D.pick_trigger(pipe.tokenizer, name, avoid)
        data = D.world_identity_data(name, f"a {trigger} creature", n=4, seed=0)
        with torch.random.fork_rng():
            result = train_lora(pipe, data, TrainConfig(steps=2, batch=2, prior_batch=0, rank=2, alpha=2.0,
                                                        lr=1e-2, text_lr=1e-2), log_every=0)
        assert all(float(layer.up.abs().max()) > 0 for layer in result.layers.values())
        save_trained(result, root / f"{name}.safetensors", format="kohya", family=family_of(pipe), trigger=trigger)
        entries.append({"name": name, "kind": "identity", "identity": name, "style": None, "trigger": trigger,
                        "phrase": "a {trigger} creature", "file": f"{name}.safetensors", "format": "kohya",
                        "steps": 2})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"base": str(base), "base_step": 3, "concepts": entries}))
    return base, manifest


def _check_stat(s: dict, low: float, high: float) -> None:
    for k in ("mean", "low", "high"):
        assert math.isfinite(s[k]) and low <= s[k] <= high, s
    assert s["low"] <= s["mean"] <= s["high"] and s["n"] >= 1


def test_quick_run(bench, world, tmp_path):
    base, manifest = world
    out = tmp_path / "res" / "quality"
    methods = ["sum", "loraclr-conv", "average"]
    rc = bench.main(["--quick", "--manifest", str(manifest), "--base", str(base), "--methods", *methods,
                     "--steps", "2", "--ablations", "--ablation-mode", "converged", "--ablation-n", "2",
                     "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert not out.with_name("quality.partial.json").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("plots skipped" in n for n in doc["meta"]["notes"])
    else:
        for metric in ("identity", "text", "image"):
            assert (out.parent / f"quality_{metric}.png").stat().st_size > 0

    meta = doc["meta"]
    assert meta["manifest_base_step"] == meta["base_step"] == 3 and meta["sizes"]["steps"] == 2
    assert meta["git_commit"] and meta["base"] == str(base)  # merged on a private copy, reported by its source
    assert set(doc["aggregate"]) == {"1", "2"} and "## N = 1" in md and "## N = 2" in md
    for n, by_label in doc["aggregate"].items():
        assert list(by_label) == methods, n
        for label, a in by_label.items():
            assert f"| {label} |" in md
            _check_stat(a["single"]["identity"], 0, 1)
            _check_stat(a["own"]["identity"], 0, 1)
            for metric in ("text", "image"):
                _check_stat(a["single"][metric], -1, 1)
                _check_stat(a["own"][metric], -1, 1)
            assert a["merge_s"] > 0 and a["eval_s"] > 0
            if n == "2":
                _check_stat(a["multi"]["identity"], 0, 1)
                _check_stat(a["multi"]["all_identities"], 0, 1)
            else:
                assert a["multi"] is None
    # one LoRA summed is that LoRA: every image scores exactly as the own-LoRA reference's
    (unit,) = [u for u in doc["units"] if u["label"] == "sum" and u["n"] == 1]
    (name,) = unit["subset"]
    merged = unit["single"]["images"]
    own = doc["references"][name]["single"]["images"]
    assert len(merged) == len(own) == 2
    for a, b in zip(merged, own, strict=True):
        assert (a["scored_text"], a["seed"], a["text"], a["image"], a["identity"]) == \
            (b["scored_text"], b["seed"], b["text"], b["image"], b["identity"])
    s1 = doc["aggregate"]["1"]["sum"]
    assert s1["single"] == s1["own"]
    # ... so its paired identity distances differ by exactly 0; other rows carry a difference of distances
    assert s1["identity_distance_diff"]["mean"] == 0.0 and s1["identity_distance_diff"]["n"] == 2
    for by_label in doc["aggregate"].values():
        for a in by_label.values():
            _check_stat(a["identity_distance_diff"], -2, 2)

    ab = doc["ablations"]
    assert ab["subset"] == list(CONCEPTS) and ab["mode"] == "converged"
    rows = {(r["group"], r["value"]): r for r in ab["rows"]}
    assert set(rows) == {("margin", 0.0), ("margin", 0.5), ("layers", "text_encoder"), ("layers", "all")}
    for r in rows.values():
        assert "error" not in r
        _check_stat(r["single"]["identity"], 0, 1)
        assert all(v is None or 0 <= v <= 1 for v in r["hinge"].values())
    # the default margin and "all layers" are one merge, evaluated once
    assert rows[("margin", 0.5)]["single"] == rows[("layers", "all")]["single"]
    te_only = rows[("layers", "text_encoder")]["hinge"]
    assert te_only["text_encoder"] is not None and te_only["cross_attention"] is None and te_only["spatial"] is None
    assert "## Ablations" in md


def test_layer_ablation_takes_the_naive_sum_outside_the_set(bench, world):
    from loraclr.evaluate import Evaluators, load_manifest

    base, manifest = world
    specs = load_manifest(manifest)

    class _NoClip:  # the Scorer embeds reference images; nothing is scored here
        name = "none"

        def embed_images(self, images):
            return torch.ones(len(images), 2)

        def embed_texts(self, texts):
            return torch.ones(len(texts), 2)

    b = bench.Bench(base, specs, Evaluators(_NoClip()), bench.QUICK_SIZES)
    settings = {"mode": "converged"}
    te_only = b.merge(CONCEPTS, "loraclr", settings, "text_encoder")
    full = b.merge(CONCEPTS, "loraclr", settings)
    naive = b.merge(CONCEPTS, "sum", {})
    for name, p in te_only.pipe.unet.named_parameters():
        assert torch.equal(p, dict(naive.pipe.unet.named_parameters())[name]), name
    te = dict(te_only.pipe.text_encoder.named_parameters())
    assert all(torch.equal(p, te[n]) for n, p in full.pipe.text_encoder.named_parameters())
    assert any(not torch.equal(p, dict(naive.pipe.text_encoder.named_parameters())[n]) for n, p in te.items())


def test_ablation_grids(bench):
    from loraclr.recipe import RECOMMENDED

    paper = bench.ablation_units("paper", quick=False)
    assert {g for g, *_ in paper} == {"margin", "lambda_reg", "steps", "layers"}
    assert all(s["mode"] == "paper" for _, _, s, _ in paper)
    conv = bench.ablation_units("converged", quick=False)
    assert {g for g, *_ in conv} == {"margin", "lambda_reg", "ridge", "layers"}  # no steps: it converges
    for group, value, settings, layers in conv:  # one setting varied around the recommended preset
        want = {**RECOMMENDED["loraclr"], **({} if group == "layers" else {group: value})}
        assert settings == want and layers == (value if group == "layers" else "all")


def test_extend_reuses_a_finished_run(bench, world, tmp_path):
    base, manifest = world
    first, second = tmp_path / "a" / "quality", tmp_path / "b" / "quality"
    common = ["--quick", "--manifest", str(manifest), "--base", str(base), "--steps", "2", "--ns", "1"]
    assert bench.main([*common, "--methods", "sum", "--out", str(first)]) == 0
    old = json.loads(first.with_suffix(".json").read_text())
    assert bench.main([*common, "--methods", "sum", "average", "--extend", str(first.with_suffix(".json")),
                       "--out", str(second)]) == 0
    new = json.loads(second.with_suffix(".json").read_text())
    (old_sum,) = [u for u in old["units"] if u["label"] == "sum"]
    (new_sum,) = [u for u in new["units"] if u["label"] == "sum"]
    assert new_sum == old_sum  # taken over, not merged and drawn again (timings would differ)
    assert [u["label"] for u in new["units"]] == ["sum", "average"]
    assert new["references"] == old["references"]
    assert [x["results"] for x in new["meta"]["extends"]] == [str(first.with_suffix(".json"))]
    assert "It extends" in second.with_suffix(".md").read_text()
    # a run with other sizes cannot take them
    with pytest.raises(ValueError, match="other settings"):
        bench.main([*common, "--seeds", "3", "--methods", "sum", "--extend", str(first.with_suffix(".json")),
                    "--out", str(tmp_path / "c" / "quality")])


def test_stages_oracle_and_kept_effect(world, tmp_path, script):
    """bench/stages.py: the oracle's all-stages row is the own LoRA (the same images as the sweep's reference),
    and the kept-effect error is exactly 0 for one LoRA merged by the sum and exactly 1 for no LoRA weight."""
    stages = script("bench/stages.py", "bench_stages")
    base, manifest = world
    out = tmp_path / "stages"
    rc = stages.main(["--manifest", str(manifest), "--base", str(base), "--steps", "2", "--prompts", "1",
                      "--seeds", "1", "--ns", "1", "2", "--methods", "sum", "none", "--swap", "--swap-n", "1",
                      "--swap-method", "sum", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert set(doc["oracle"]) == set(stages.ORACLE)
    own = doc["oracle"]["own LoRA (all stages)"]["concepts"]
    for name in CONCEPTS:
        ref = stages.Q.single_values(_reference(stages.Q, base, manifest, name)["single"]["images"])
        assert own[name]["text"] == pytest.approx(sum(ref["text"]) / len(ref["text"]), abs=1e-5)
    rows = {(r["n"], r["method"]): r for r in doc["kept"]}
    for key in ("in-sample text_encoder", "in-sample spatial", "held-out text_encoder", "held-out spatial"):
        assert rows[(1, "sum")][key] == pytest.approx(0.0, abs=1e-4), key
        assert rows[(2, "none")][key] == pytest.approx(1.0, abs=1e-5), key
        assert rows[(2, "sum")][key] > 1e-3, key  # the other concept's delta is an error for this one
    assert "## 2. Kept effect" in out.with_suffix(".md").read_text()
    # part 3 on one LoRA merged by the sum: the merge is that LoRA, so every swap row draws the own LoRA's images
    sw = doc["swap"]
    assert sw["subset"] == [next(iter(CONCEPTS))] and set(sw["rows"]) == {"own LoRA alone", *stages.SWAP}
    own_imgs = sw["rows"]["own LoRA alone"]["images"]
    for row, r in sw["rows"].items():
        assert [(a["text"], a["identity_distance"]) for a in r["images"]] == \
            [(a["text"], a["identity_distance"]) for a in own_imgs], row
        assert r["distance_minus_own"]["mean"] == 0.0
    assert "## 3. Swap oracle" in out.with_suffix(".md").read_text()


def _reference(Q, base, manifest, name):
    from loraclr.evaluate import load_evaluators, load_manifest

    specs = [s for s in load_manifest(manifest) if s.kind == "identity"]
    bench = Q.Bench(base, specs, load_evaluators(), Q.Sizes(steps=2, prompts=1, seeds=1, pairs=0, triples=0))
    return bench.reference(name)


def test_method_labels_may_override_the_feature_run(bench, world):
    """A label's "features" entry changes the recipe's feature settings, never reaches the method's settings, and
    leaves the METHODS table untouched (labels are reused by every unit)."""
    from types import SimpleNamespace

    from loraclr.evaluate import load_manifest

    base, manifest = world
    specs = {s.name: s for s in load_manifest(manifest)}
    fake = SimpleNamespace(base_dir=base, specs=specs, allow_pickle=False, sizes=bench.Sizes(feature_steps=7))
    method, settings = bench.METHODS["loraclr-conv-mean-ridge1e-1-fs5-sp2"]
    r = bench.Bench.recipe(fake, list(CONCEPTS), method, settings)
    assert (r.features.steps, r.features.spatial_prompts) == (5, 2)
    assert "features" not in r.method.settings and r.method.settings["ridge"] == 0.1
    assert "features" in bench.METHODS["loraclr-conv-mean-ridge1e-1-fs5-sp2"][1]
    plain = bench.Bench.recipe(fake, list(CONCEPTS), *bench.METHODS["loraclr-conv-mean-ridge1e-1"])
    assert (plain.features.steps, plain.features.spatial_prompts) == (7, 2)  # the merge's default prompts
    fs10 = bench.Bench.recipe(fake, list(CONCEPTS), *bench.METHODS["loraclr-conv-mean-ridge1e-1-fs10"])
    assert (fs10.features.steps, fs10.features.spatial_prompts) == (10, 1)  # the sessions-9-11 default
    # the unit key (resume, --extend) accepts the override and tells the feature runs apart
    keys = {bench.Run.key(list(CONCEPTS), *bench.METHODS[label], "all")
            for label in ("loraclr-conv-mean-ridge1e-1", "loraclr-conv-mean-ridge1e-1-fs5",
                          "loraclr-conv-mean-ridge1e-1-fs5-sp2")}
    assert len(keys) == 3


def test_paired_differences_use_twin_images_only(script, tmp_path):
    """bench/paired.py: differences are taken image by image between twins (same subset, concept, prompt, seed);
    an image without a twin in the reference is left out; the file is written beside the results."""
    paired = script("bench/paired.py", "bench_paired")

    def rec(concept, seed, dist, ok):
        return {"concepts": [concept], "scored_text": f"{concept} at the beach", "seed": seed,
                "identity_distance": [dist], "identity": [ok]}

    units = [
        {"label": "ref", "subset": ["a", "b"], "single": {"images": [rec("a", 0, 0.2, False), rec("b", 0, 0.1, True)]}},
        {"label": "new", "subset": ["a", "b"], "single": {"images": [rec("a", 0, 0.1, True), rec("b", 0, 0.1, True),
                                                                      rec("b", 9, 0.0, True)]}},
        {"label": "broken", "subset": ["a", "b"], "error": "boom"},
    ]
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"units": units}))
    assert paired.main([str(path), "--reference", "ref"]) == 0
    (row,) = paired.paired(json.loads(path.read_text()), "ref")
    assert row["label"] == "new" and row["pairs"] == 2
    assert row["distance"]["mean"] == pytest.approx(-0.05) and row["identity"]["mean"] == pytest.approx(0.5)
    assert "| new | 2 |" in (tmp_path / "q_paired_ref.md").read_text()
