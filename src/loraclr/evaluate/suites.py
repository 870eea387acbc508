"""Single- and multi-concept evaluation suites (LoRACLR Table 1 / Fig. 5), for any image source.

A suite builds prompts from concept specs, asks an image source for images at fixed seeds, and scores each
image with the evaluators:
* single: per concept, ``n_prompts`` prompts (``"{c} at the beach"``, ...) x ``seeds`` seeds;
* multi: pairs and triples of identity concepts, ``"{a} on the left and {b} on the right at the beach"``;
  each identity is scored in its slot's region (:mod:`loraclr.evaluate.regions`). With ``regions`` (a mode
  of :mod:`loraclr.regional`) each character is also drawn in that region with its own prompt
  (``"{a} on the left at the beach"``): the boxes the evaluator scores are the boxes the sampler binds.
Text alignment scores the prompt with every trigger replaced by its concept's description (see
:mod:`loraclr.evaluate.concepts`). Results: a JSON-able dict (means with bootstrap 95 % intervals, and every
image's scores) and a markdown table (:func:`to_markdown`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from loraclr.evaluate import metrics, regions
from loraclr.evaluate.base import FULL, Evaluators, to_tensor
from loraclr.evaluate.concepts import ConceptSpec, reference_images
from loraclr.world import scenes as S

log = logging.getLogger(__name__)

BACKGROUND_PHRASES = tuple(S.BACKGROUND_PHRASE.values())  # beach, forest, snow, city, night, room
SLOT_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


@dataclass(frozen=True)
class Prompt:
    template: str  # "{rubo} on the left and {tavi} on the right at the beach"
    concepts: tuple[str, ...]  # concept names, left to right
    slots: tuple[str, ...]  # their slots
    region_templates: tuple[str, ...] = ()  # per concept: "{rubo} on the left at the beach"

    def fill(self, words: dict[str, str]) -> str:
        return self.template.format(**words)

    def plan(self, words: dict[str, str], mode: str, start: float):
        """The regional plan that draws each concept in its scoring region (:mod:`loraclr.regional`)."""
        from loraclr.regional import Region, RegionalPlan

        n = len(self.concepts)
        return RegionalPlan(tuple(Region(regions.region(n, slot), t.format(**words))
                                  for slot, t in zip(self.slots, self.region_templates, strict=True)),
                            mode=mode, start=start)


class ImageSource(Protocol):
    """What a suite evaluates: images for a prompt at given seeds, and the text that calls a concept."""

    name: str

    def trigger(self, spec: ConceptSpec) -> str: ...

    def __call__(self, prompt: str, seeds: list[int], regions=None, concepts: tuple[str, ...] = ()) -> Tensor:
        """(len(seeds), 3, H, W) in [0, 1]; ``regions``: a :class:`loraclr.regional.RegionalPlan` whose region
        i shows ``concepts[i]``."""


class PipelineSource:
    """A loaded :class:`loraclr.pipeline.Model` (merged output, base + LoRAs, or base alone), sampled with
    :func:`loraclr.pipeline.generate`. A merged output's own trigger for a concept wins over the manifest's
    (the merge may rename tokens so that concepts never collide)."""

    def __init__(self, model, name: str, steps: int = 25, guidance: float = 7.5, negative: str = ""):
        self.model, self.name = model, name
        self.steps, self.guidance, self.negative = steps, guidance, negative
        self.structure = None  # a loraclr.structure.Structure applied to regional prompts (drawn from the boxes)

    def trigger(self, spec: ConceptSpec) -> str:
        return self.model.triggers.get(spec.name, spec.trigger)

    def __call__(self, prompt: str, seeds: list[int], regions=None, concepts: tuple[str, ...] = ()) -> Tensor:
        from loraclr.pipeline import generate

        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError(f"PipelineSource draws consecutive seeds; got {seeds}")
        images = generate(self.model, [prompt], n=len(seeds), seed=seeds[0], negative=self.negative,
                          guidance=self.guidance, steps=self.steps, progress=False, regions=regions,
                          region_layers=self.region_layers(regions, concepts),
                          structure=self.structure if regions is not None else None)
        return to_tensor(images)

    def region_layers(self, regions, concepts) -> list[dict] | None:
        return None


class OwnLorasPerRegion(PipelineSource):
    """The upper reference for regional images: the base model with every concept's learned tokens, each
    region denoised by its own concept's LoRA alone and the predictions blended by the boxes (what OMG-style
    methods do at inference time; ``noise`` mode of :mod:`loraclr.regional`). No single set of weights can
    do better, so it shows how much of the multi-concept loss is the merge's and how much the base's."""

    def __init__(self, base, specs: list[ConceptSpec], *, steps: int = 25, guidance: float = 7.5,
                 negative: str = "", allow_pickle: bool = False):
        from loraclr.pipeline import load_separate

        for s in specs:
            if s.file is None:
                raise ValueError(f"concept {s.name!r} has no LoRA 'file' in the manifest")
        model, layers = load_separate(str(base), [(str(s.file), 1.0) for s in specs], allow_pickle=allow_pickle)
        super().__init__(model, f"{base} + each region's own LoRA", steps, guidance, negative)
        self.layers = {s.name: lay for s, lay in zip(specs, layers, strict=True)}

    def region_layers(self, regions, concepts) -> list[dict] | None:
        if regions is None:
            raise ValueError("the per-region own-LoRA reference draws regional prompts only (use --regions)")
        if regions.mode != "noise":
            raise ValueError("the per-region own-LoRA reference needs the noise mode (one UNet pass per region)")
        return [self.layers[c] for c in concepts]


# --- prompts ---------------------------------------------------------------------------------------------

def single_prompts(spec: ConceptSpec, n_prompts: int, seed: int = 0) -> list[Prompt]:
    """``n_prompts`` prompts for one concept: settings in turn; a style is applied to fixed base subjects."""
    if spec.kind == "identity":
        return [Prompt(f"{{{spec.name}}} {bg}", (spec.name,), ("middle",))
                for bg in itertools.islice(itertools.cycle(BACKGROUND_PHRASES), n_prompts)]
    rng = np.random.default_rng([seed, 31])
    out = []
    for bg in itertools.islice(itertools.cycle(BACKGROUND_PHRASES), n_prompts):
        subject = S.caption_identity(S.sample_base_identity(rng))
        out.append(Prompt(f"{subject} {bg}, {{{spec.name}}}", (spec.name,), ("",)))  # a style has no slot
    return out


def multi_prompts(specs: list[ConceptSpec], n_pairs: int, n_triples: int, seed: int = 0) -> list[Prompt]:
    """Pairs and triples of distinct identity concepts (seeded draws; every concept appears when possible)."""
    names = [s.name for s in specs if s.kind == "identity"]
    rng = np.random.default_rng([seed, 47])
    out = []
    for size, count in ((2, n_pairs), (3, n_triples)):
        if len(names) < size or count == 0:
            continue
        combos = list(itertools.combinations(names, size))
        order = rng.permutation(len(combos))[:count]
        for j, k in enumerate(order):
            group = [combos[k][i] for i in rng.permutation(size)]
            bg = BACKGROUND_PHRASES[j % len(BACKGROUND_PHRASES)]
            if size == 2:
                t = f"{{{group[0]}}} on the left and {{{group[1]}}} on the right {bg}"
            else:
                t = f"{{{group[0]}}} on the left, {{{group[1]}}} in the middle and {{{group[2]}}} on the right {bg}"
            slots = regions.slots_for(size)
            per_region = tuple(f"{{{c}}} {SLOT_PHRASE[slot]} {bg}" for c, slot in zip(group, slots, strict=True))
            out.append(Prompt(t, tuple(group), slots, per_region))
    return out


# --- scoring ---------------------------------------------------------------------------------------------

class Scorer:
    """Evaluators plus per-concept references (computed once)."""

    def __init__(self, evaluators: Evaluators, specs: list[ConceptSpec], n_references: int = 8):
        self.ev = evaluators
        self.specs = {s.name: s for s in specs}
        tim = evaluators.text_image
        self.image_refs = {s.name: metrics.reference_embedding(tim.embed_images(reference_images(s, n_references)))
                           for s in specs}
        self.gallery_names: list[str] = []
        self.gallery: Tensor | None = None
        ident = evaluators.identity
        people = [s for s in specs if s.kind == "identity"]
        from loraclr.evaluate.world import WorldIdentity

        if isinstance(ident, WorldIdentity) and not all(s.identity for s in people):
            # our embedder knows the miniature world's creatures only
            log.warning("identity alignment skipped: concepts %s are not world identities; use --face for "
                        "real faces", [s.name for s in people if not s.identity])
        elif ident is not None and people:
            self._build_gallery(people, n_references)

    def _build_gallery(self, specs: list[ConceptSpec], n: int) -> None:
        ident = self.ev.identity
        from loraclr.evaluate.world import WorldIdentity, identity_references

        if isinstance(ident, WorldIdentity) and all(s.identity for s in specs):
            # every world concept identity, as in calibration (a stricter and fixed gallery)
            keys = list(S.CONCEPTS)
            self.gallery = identity_references(ident, [S.CONCEPTS[k] for k in keys], n)
            self._gallery_index = {s.name: keys.index(s.identity) for s in specs}
            self.gallery_names = keys
        else:
            refs = []
            for s in specs:
                imgs = reference_images(s, n)
                emb = ident.embed_regions(imgs, torch.tensor([FULL] * len(imgs)))
                emb = emb[torch.isfinite(emb).all(1)]
                if len(emb) == 0:
                    raise ValueError(f"concept {s.name!r}: the identity extractor found nothing in its "
                                     "reference images")
                refs.append(metrics.reference_embedding(emb))
            self.gallery = torch.stack(refs) if refs else None
            self._gallery_index = {s.name: i for i, s in enumerate(specs)}
            self.gallery_names = [s.name for s in specs]

    def score(self, images: Tensor, prompt: Prompt, scored_text: str) -> list[dict]:
        tim = self.ev.text_image
        img = tim.embed_images(images)
        text = tim.embed_texts([scored_text])[0]
        t_al = metrics.cosine(img, text)
        names = list(prompt.concepts)
        i_al = torch.stack([metrics.cosine(img, self.image_refs[n]) for n in names]).T  # (B, k)
        ident: list[list[bool | None]] = [[None] * len(names) for _ in range(len(images))]
        # distance to the intended identity: the continuous value behind the recognised/not rate (paired
        # comparisons between models on the same prompts and seeds have far less noise on it)
        ident_d: list[list[float | None]] = [[None] * len(names) for _ in range(len(images))]
        # who the region shows instead, when it is another concept of the gallery (leakage between concepts)
        other: list[list[str | None]] = [[None] * len(names) for _ in range(len(images))]
        if self.gallery is not None:
            for j, (name, slot) in enumerate(zip(prompt.concepts, prompt.slots, strict=True)):
                if name not in self._gallery_index:
                    continue
                box = torch.tensor([regions.region(len(prompt.concepts), slot)] * len(images))
                emb = self.ev.identity.embed_regions(images, box)
                d = metrics.distances(emb, self.gallery)
                target = torch.full((len(images),), self._gallery_index[name], dtype=torch.long)
                ok = metrics.recognised(d, target, self.ev.identity.threshold)
                own = d.gather(1, target.view(-1, 1)).squeeze(1)
                nearest = d.argmin(1)
                for b in range(len(images)):
                    ident[b][j] = bool(ok[b])
                    ident_d[b][j] = float(own[b])
                    k = int(nearest[b])
                    if k != self._gallery_index[name] and float(d[b, k]) < self.ev.identity.threshold:
                        other[b][j] = self.gallery_names[k]
        return [{"text": float(t_al[b]), "image": [float(v) for v in i_al[b]], "identity": ident[b],
                 "identity_distance": ident_d[b], "shows_other": other[b], "concepts": names}
                for b in range(len(images))]


# --- suites ----------------------------------------------------------------------------------------------

def run_suite(source: ImageSource, specs: list[ConceptSpec], evaluators: Evaluators, suite: str = "single", *,
              n_prompts: int = 4, seeds: int = 4, seed: int = 0, n_pairs: int = 6, n_triples: int = 3,
              scorer: Scorer | None = None, image_dir: str | Path | None = None, progress: bool = True,
              regions: str | None = None, region_start: float | None = None) -> dict:
    """Generate and score one suite; returns the results dict (see :func:`summarise`).

    regions: a mode of :mod:`loraclr.regional` ("attention", "noise"): multi-concept prompts are drawn with
    each character bound to its scoring region from ``region_start`` (a fraction of the steps) on.
    """
    from loraclr.regional import DEFAULT_START

    if suite not in ("single", "multi"):
        raise ValueError(f"unknown suite {suite!r}; use 'single' or 'multi'")
    if regions is not None and suite != "multi":
        raise ValueError("regions apply to the multi-concept suite only")
    start = DEFAULT_START if region_start is None else region_start
    scorer = scorer or Scorer(evaluators, specs)
    if suite == "single":
        prompts = [p for s in specs for p in single_prompts(s, n_prompts, seed)]
    else:
        prompts = multi_prompts(specs, n_pairs, n_triples, seed)
        if not prompts:
            raise ValueError("the multi-concept suite needs at least two identity concepts")
    by = {s.name: s for s in specs}
    triggers = {n: s.prompt_phrase(source.trigger(s)) for n, s in by.items()}
    descriptions = {n: s.description for n, s in by.items()}
    records = []
    bar = _progress(len(prompts), f"{suite}{'' if regions is None else '+' + regions} [{source.name}]", progress)
    for i, p in enumerate(prompts):
        gen_text, scored_text = p.fill(triggers), p.fill(descriptions)
        seed_list = list(range(seed, seed + seeds))
        if regions is None:
            images = source(gen_text, seed_list)
        else:
            images = source(gen_text, seed_list, regions=p.plan(triggers, regions, start), concepts=p.concepts)
        if image_dir is not None:
            _save(images, Path(image_dir) / suite, i)
        for sd, r in zip(seed_list, scorer.score(images, p, scored_text), strict=True):
            records.append({"prompt": gen_text, "scored_text": scored_text, "seed": sd, **r})
        bar.update(1)
    bar.close()
    return summarise(records, suite, source.name, evaluators,
                     {"n_prompts": n_prompts, "seeds": seeds, "seed": seed, "n_pairs": n_pairs,
                      "n_triples": n_triples, "identity_gallery": scorer.gallery_names,
                      "regions": regions, "region_start": start if regions else None})


def summarise(records: list[dict], suite: str, source: str, evaluators: Evaluators, settings: dict) -> dict:
    """Per-concept and overall means with bootstrap 95 % intervals, from per-image records."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in records:
        for j, name in enumerate(r["concepts"]):
            d = per.setdefault(name, {"text": [], "image": [], "identity": []})
            d["text"].append(r["text"])
            d["image"].append(r["image"][j])
            if r["identity"][j] is not None:
                d["identity"].append(float(r["identity"][j]))

    stat = metrics.summary
    per_concept = {n: {k: stat(v) for k, v in d.items()} for n, d in per.items()}
    ident_all = [float(x) for r in records for x in r["identity"] if x is not None]
    overall = {
        "text": stat([r["text"] for r in records]),
        "image": stat([float(np.mean(r["image"])) for r in records]),
        "identity": stat(ident_all),
    }
    if suite == "multi":
        overall["all_identities"] = stat([float(all(r["identity"])) for r in records
                                          if r["identity"] and None not in r["identity"]])
        # a region recognised as another concept (of the prompt: swapped characters; else leaked from the merge)
        overall["leakage"] = stat([float(o is not None) for r in records if "shows_other" in r
                                   for o, i in zip(r["shows_other"], r["identity"], strict=True) if i is not None])
    ident = evaluators.identity
    return {
        "suite": suite, "source": source,
        "evaluators": {"text_image": evaluators.text_image.name,
                       "identity": None if ident is None else ident.name,
                       "identity_threshold": None if ident is None else ident.threshold},
        "settings": settings, "overall": overall, "per_concept": per_concept, "images": records,
    }


def _fmt(s: dict | None) -> str:
    return "-" if s is None else f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def to_markdown(results: dict | list[dict]) -> str:
    """One table per results dict: overall first, then each concept; 95 % bootstrap intervals."""
    out = []
    for res in results if isinstance(results, list) else [results]:
        o = res["overall"]
        out.append(f"### {res['suite']}-concept suite: {res['source']}\n")
        multi = "all_identities" in o
        extra = " | all identities | leakage" if multi else ""
        if res.get("settings", {}).get("regions"):
            out.append(f"Regions: {res['settings']['regions']} mode, from {res['settings']['region_start']:.0%} "
                       "of the steps.\n")
        out.append(f"| concept | images | text alignment | image alignment | identity alignment{extra} |")
        out.append("|---|---|---|---|---" + ("|---|---|" if multi else "|"))
        n = o["text"]["n"] if o["text"] else 0
        row = f"| **all** | {n} | {_fmt(o['text'])} | {_fmt(o['image'])} | {_fmt(o['identity'])}"
        out.append(row + (f" | {_fmt(o['all_identities'])} | {_fmt(o.get('leakage'))} |" if multi else " |"))
        for name, d in res["per_concept"].items():
            n = d["text"]["n"] if d["text"] else 0
            row = f"| {name} | {n} | {_fmt(d['text'])} | {_fmt(d['image'])} | {_fmt(d['identity'])}"
            out.append(row + (" | | |" if multi else " |"))
        ev = res["evaluators"]
        out.append(f"\nEvaluators: {ev['text_image']}, {ev['identity']} (threshold {ev['identity_threshold']}).\n")
    return "\n".join(out)


def _save(images: Tensor, folder: Path, i: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for j, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:03d}-{j}.png")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt")
