"""Quality of merged concepts against their number, in the miniature world: LoRACLR Table 1 / Fig. 5 (N sweep)
and Fig. 8 (ablations).

N sweep: for each N in ``--ns`` (identity concepts of the manifest; an N above their number becomes that number)
``--subsets`` seeded random subsets of N concepts (N = 1: ``--singles`` concepts; N = all: one) are merged in
memory (:func:`loraclr.merging.merge_model`) by every method variant and scored by :mod:`loraclr.evaluate`:

* single-concept suite: each concept alone ("{c} at the beach", ...): text / image / identity alignment;
* multi-concept suite (N >= 2): pairs and triples, each identity scored in its own region (per-region
  identity) and "all identities right" per image.

The "before merging" reference draws each concept with the base model and only its own LoRA, once per concept,
reused for every subset that holds it. Per (N, method) the images of all subsets are pooled: means with
bootstrap 95 % intervals (:func:`loraclr.evaluate.metrics.mean_ci`), the own-LoRA reference on the very same
concepts, prompts and seeds, and identity merged / own (ratio of means, paired bootstrap over images).

Ablations (``--ablations``): on one fixed subset (N = 5 or the largest below), LoRACLR with one setting varied
at a time. ``--ablation-mode paper``: around the official recipe, margin, lambda_reg, solver steps (AdamW) and
which layers LoRACLR merges (text encoder / + cross-attention k, v / all; the other layers take the naive sum of
deltas). ``--ablation-mode converged``: around the recommended preset of ``loraclr merge``
(``loraclr.recipe.RECOMMENDED``: converged, anchored at the mean of the deltas, ridge 0.1), margin, lambda_reg,
ridge and layers (no steps: it runs to convergence). Per row: the suites' alignments and the mean fraction of active
hinge terms per layer type (layers LoRACLR merged only).

Outputs: ``<out>.json`` (every number and per-image score, settings, seeds, subsets, git commit, the manifest's
base step, timings per merge and per evaluation), ``<out>.md`` (one table per N, the ablations, the cost) and
``<out>_{identity,text,image}.png`` (metric vs N per method, own-LoRA reference dashed; needs matplotlib, the
``plot`` extra, else skipped with a note). During the run ``<out>.partial.json`` holds every finished unit;
``--resume`` continues from it (same manifest and sizes only); ``--extend <old>.json`` reuses a finished run's
units (e.g. to add N or methods to it, or to join runs made in parallel).

Cost (one torch thread, mini SD at 64 px): an image with 25 steps and guidance, scored: about 1.2 CPU s. Merge wall seconds at N = 1 / 2 / 3: sum, average,
svd, ties, dare 0.3-1.7; lstsq 1.9 / 2.3 / 4.8; converged (any ridge) 2-4 / 2-3 / 4-5; converged with
normalize 3 / 16 / 46; converged with token distances 4 / 102 / 129 (majorise-minimise steps once hinges fire);
paper 9 / 17 / 35 (50 AdamW steps per layer). Images per (subset, method): N x prompts x seeds single +
(pairs + triples) x seeds multi. The default run (12 identities, 14 subsets, 16 methods, ~8900 images) is
about 3 h of images on a quiet core plus ~1-2 h of merges (token and paper modes at N = 8, 12 dominate);
``--resume`` spreads it over several runs.

    python bench/quality.py                            # the N sweep, every method (hours: see the .md's cost)
    python bench/quality.py --ablations --methods loraclr-paper,loraclr-conv,sum
    python bench/quality.py --quick --manifest runs/q/concepts/manifest.json --out runs/q/quality
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONV = {"mode": "converged"}
# label -> (registry name, method settings)
METHODS: dict[str, tuple[str, dict]] = {
    "loraclr-paper": ("loraclr", {"mode": "paper"}),
    "loraclr-conv": ("loraclr", dict(CONV)),
    "loraclr-conv-ridge1e-3": ("loraclr", {**CONV, "ridge": 1e-3}),
    "loraclr-conv-ridge1e-2": ("loraclr", {**CONV, "ridge": 1e-2}),
    "loraclr-conv-ridge1e-1": ("loraclr", {**CONV, "ridge": 1e-1}),
    # anchored at the naive sum: lambda_reg / ridge pull towards stacking, unexcited directions keep the sum
    "loraclr-conv-sum": ("loraclr", {**CONV, "anchor": "sum"}),
    "loraclr-conv-sum-ridge1e-2": ("loraclr", {**CONV, "anchor": "sum", "ridge": 1e-2}),
    "loraclr-conv-sum-ridge1e-1": ("loraclr", {**CONV, "anchor": "sum", "ridge": 1e-1}),
    "loraclr-conv-ridge1": ("loraclr", {**CONV, "ridge": 1.0}),
    # anchored at the mean of the deltas (= average merging): ridge pulls towards averaging
    "loraclr-conv-mean-ridge1e-1": ("loraclr", {**CONV, "anchor": "mean", "ridge": 1e-1}),
    "loraclr-conv-mean-ridge1": ("loraclr", {**CONV, "anchor": "mean", "ridge": 1.0}),
    # the same with another feature run: "features" (popped by Bench.recipe) overrides the recipe's feature
    # settings; fsK = K steps, sp1 / sp2 = one / both feature prompts drive it. The merge's default is
    # fs5-sp2; fs10 is the official-style run of one prompt (in bench/results/quality_defaults.md, which ran with
    # the sizes' feature_steps at 10, the plain label is fs10 and fs5 is fs5-sp1)
    "loraclr-conv-mean-ridge1e-1-fs10": ("loraclr", {**CONV, "anchor": "mean", "ridge": 1e-1,
                                                     "features": {"steps": 10, "spatial_prompts": 1}}),
    "loraclr-conv-mean-ridge1e-1-fs5": ("loraclr", {**CONV, "anchor": "mean", "ridge": 1e-1,
                                                    "features": {"steps": 5, "spatial_prompts": 1}}),
    "loraclr-conv-mean-ridge1e-1-fs5-sp2": ("loraclr", {**CONV, "anchor": "mean", "ridge": 1e-1,
                                                        "features": {"steps": 5, "spatial_prompts": 2}}),
    "loraclr-conv-token": ("loraclr", {**CONV, "distance": "token"}),
    "loraclr-conv-norm": ("loraclr", {**CONV, "normalize": True}),
    "lstsq": ("lstsq", {}),
    "average": ("average", {}),
    "sum": ("sum", {}),  # = naive stacking, exactly (the sum of the deltas)
    "svd": ("svd", {}),
    "ties": ("ties", {}),
    "dare": ("dare", {}),
    "none": ("none", {}),  # no LoRA weight: the base plus the learned tokens (what the weights add over them)
}
QUICK_METHODS = ("loraclr-conv", "sum")
# Fig. 8: one setting varied at a time around the defaults (margin 0.5, lambda_reg 1e-3, 50 steps, all layers)
ABLATIONS: dict[str, tuple] = {
    "margin": (0.0, 0.25, 0.5, 1.0, 2.0),
    "lambda_reg": (0.0, 1e-3, 1e-2, 1e-1),
    "steps": (10, 50, 200),
    "layers": ("text_encoder", "cross_attention", "all"),
}
# converged mode runs to convergence (no steps); its preset's ridge is varied instead
CONVERGED_ABLATIONS: dict[str, tuple] = {
    "margin": ABLATIONS["margin"], "lambda_reg": ABLATIONS["lambda_reg"], "ridge": (0.0, 1e-2, 1e-1, 1.0),
    "layers": ABLATIONS["layers"],
}
QUICK_ABLATIONS: dict[str, tuple] = {"margin": (0.0, 0.5), "layers": ("text_encoder", "all")}
# the merge's stages that each "layers" row merges with LoRACLR (merge_model's report "stage" per layer)
LAYER_SETS = {"text_encoder": ("text_encoder",), "cross_attention": ("text_encoder", "cross_attention"),
              "all": ("text_encoder", "cross_attention", "spatial")}
STAGES = ("text_encoder", "cross_attention", "spatial")
METRICS = ("identity", "text", "image")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What every evaluation draws: sampling (steps, guidance), suite sizes, the seed, the merge's feature run."""

    steps: int = 25
    guidance: float = 7.5
    prompts: int = 4
    seeds: int = 2
    pairs: int = 3
    triples: int = 1
    seed: int = 0
    feature_steps: int | None = None  # None: the merge's default (loraclr.recipe.FeatureSettings.steps)


QUICK_SIZES = Sizes(steps=10, prompts=1, seeds=2, pairs=1, triples=0, feature_steps=2)


# --- statistics (pure) ------------------------------------------------------------------------------------------


def stat(values: list[float]) -> dict | None:
    """Mean with a bootstrap 95 % interval over the values (images), or None without values."""
    from loraclr.evaluate.metrics import summary

    return summary(values)


def ratio_ci(num: list[float], den: list[float], n_boot: int = 1000, level: float = 0.95,
             seed: int = 0) -> dict | None:
    """mean(num) / mean(den) over paired values with a paired percentile-bootstrap interval; None when
    mean(den) is 0 (resamples whose denominator is 0 are left out of the interval)."""
    a = torch.tensor(num, dtype=torch.float64)
    b = torch.tensor(den, dtype=torch.float64)
    if len(a) == 0 or float(b.mean()) == 0.0:
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(a), (n_boot, len(a)), generator=g)
    nb, db = a[idx].mean(1), b[idx].mean(1)
    r = nb[db > 0] / db[db > 0]
    alpha = (1 - level) / 2
    return {"mean": float(a.mean() / b.mean()), "low": float(torch.quantile(r, alpha)),
            "high": float(torch.quantile(r, 1 - alpha)), "n": len(a)}


def image_key(r: dict) -> tuple:
    """An image of the single-concept suite by what it shows (the same for a merged model and the own LoRA)."""
    return r["concepts"][0], r["scored_text"], r["seed"]


def single_values(records: list[dict]) -> dict[str, list[float]]:
    return {"text": [r["text"] for r in records], "image": [float(np.mean(r["image"])) for r in records],
            "identity": [float(x) for r in records for x in r["identity"] if x is not None]}


def split_features(settings: dict) -> tuple[dict, dict | None]:
    """A label's settings -> (the method's settings, the feature-run overrides or None): METHODS entries may
    carry a "features" entry for the recipe (Bench.recipe), which the method's config does not take."""
    settings = dict(settings)
    return settings, settings.pop("features", None)


def distance_diffs(records: list[dict], own: list[dict]) -> list[float]:
    """Per image, the distance to the intended identity minus the own LoRA's on the same prompt and seed
    (records written before evaluate kept the distance have none: empty list)."""
    out = []
    for r, o in zip(records, own, strict=True):
        a, b = r.get("identity_distance"), o.get("identity_distance")
        if a and b and a[0] is not None and b[0] is not None:
            out.append(a[0] - b[0])
    return out


def multi_values(records: list[dict]) -> dict[str, list[float]]:
    out = single_values(records)
    out["all_identities"] = [float(all(r["identity"])) for r in records if r["identity"] and None not in r["identity"]]
    return out


def draw_subsets(names: list[str], ns: list[int], n_subsets: int, n_singles: int, seed: int) -> dict[int, list]:
    """Seeded distinct random subsets per N (names in manifest order): ``n_singles`` for N = 1, one for
    N = all, else ``n_subsets``; never more than there are."""
    out = {}
    for n in ns:
        want = 1 if n == len(names) else n_singles if n == 1 else n_subsets
        want = min(want, math.comb(len(names), n))
        rng = np.random.default_rng([seed, 71, n])
        picks: list[tuple[int, ...]] = []
        while len(picks) < want:
            p = tuple(sorted(int(i) for i in rng.choice(len(names), n, replace=False)))
            if p not in picks:
                picks.append(p)
        out[n] = [tuple(names[i] for i in p) for p in picks]
    return out


def hinge_by_stage(reports: dict[str, dict], stages=STAGES) -> dict[str, float | None]:
    """Mean over layers of each stage of the fraction of active hinge terms (None: no such layer / method)."""
    out = {}
    for st in stages:
        v = [float(r["hinge_active"]) for r in reports.values()
             if r.get("stage") == st and isinstance(r.get("hinge_active"), int | float)]
        out[st] = sum(v) / len(v) if v else None
    return out


# --- merging and scoring --------------------------------------------------------------------------------------


class Bench:
    """The base model, the concepts, the evaluators with one scorer, and the sizes every unit shares."""

    def __init__(self, base_dir: Path, specs: list, evaluators, sizes: Sizes):
        from loraclr.evaluate import Scorer

        self.base_dir, self.sizes, self.ev = base_dir, sizes, evaluators
        self.specs = {s.name: s for s in specs}
        self.allow_pickle = any(Path(s.file).suffix == ".pth" for s in specs)  # our own ED-LoRA files
        self.scorer = Scorer(evaluators, specs)

    def recipe(self, names, method: str, settings: dict):
        """As ``loraclr demo`` builds it (loraclr.demo.run_demo): feature prompts are the concept's prompt words
        and the bare trigger."""
        from loraclr.recipe import recipe_from_dict

        specs = [self.specs[n] for n in names]
        settings, features = split_features(settings)
        return recipe_from_dict({
            "base": str(self.base_dir), "method": {"name": method, **settings}, "allow_pickle": self.allow_pickle,
            "concepts": [{"name": s.name, "lora": str(s.file), "trigger": s.trigger,
                          "prompts": [s.prompt_phrase("{trigger}"), "{trigger}"]} for s in specs],
            "features": {"seed": self.sizes.seed, **({"steps": self.sizes.feature_steps}
                                                       if self.sizes.feature_steps is not None else {}), **(features or {})},
        }, source=f"bench recipe ({method})")

    def merge(self, names, method: str, settings: dict, layers: str = "all"):
        """The merged model; with ``layers`` other than all, the layers outside the set take the naive sum
        (copied from a ``sum`` merge of the same recipe: both start from the same base weights)."""
        from loraclr.merging import merge_model
        from loraclr.models import find_module

        m = merge_model(self.recipe(names, method, settings), progress=False)
        if layers != "all":
            keep = LAYER_SETS[layers]
            naive = merge_model(self.recipe(names, "sum", {}), progress=False)
            with torch.no_grad():
                for key, rep in m.reports.items():
                    if rep["stage"] not in keep:
                        find_module(m.pipe, key).weight.copy_(find_module(naive.pipe, key).weight)
                        m.offsets[key] = naive.offsets[key]
            for rep in m.reports.values():
                rep["used"] = rep["stage"] in keep
        return m

    def source(self, model, label: str):
        from loraclr.evaluate import PipelineSource

        return PipelineSource(model, label, steps=self.sizes.steps, guidance=self.sizes.guidance)

    def suite(self, source, names, suite: str) -> tuple[dict, float]:
        from loraclr.evaluate import run_suite

        z = self.sizes
        t = time.perf_counter()
        res = run_suite(source, [self.specs[n] for n in names], self.ev, suite, scorer=self.scorer,
                        n_prompts=z.prompts, seeds=z.seeds, seed=z.seed, n_pairs=z.pairs, n_triples=z.triples,
                        progress=False)
        return {k: v for k, v in res.items() if k not in ("evaluators", "settings")}, time.perf_counter() - t

    def has_multi(self, names) -> bool:
        from loraclr.evaluate.suites import multi_prompts

        z = self.sizes
        return bool(multi_prompts([self.specs[n] for n in names], z.pairs, z.triples, z.seed))

    def n_images(self, names) -> int:
        from loraclr.evaluate.suites import multi_prompts

        z = self.sizes
        multi = multi_prompts([self.specs[n] for n in names], z.pairs, z.triples, z.seed)
        return len(names) * z.prompts * z.seeds + len(multi) * z.seeds

    def evaluate(self, model, label: str, names) -> dict:
        src = self.source(model, label)
        out: dict = {"eval_s": {}}
        out["single"], out["eval_s"]["single"] = self.suite(src, names, "single")
        if len(names) >= 2 and self.has_multi(names):
            out["multi"], out["eval_s"]["multi"] = self.suite(src, names, "multi")
        out["n_images"] = self.n_images(names)
        return out

    def reference(self, name: str) -> dict:
        """The concept drawn by the base model with only its own LoRA: the single suite."""
        from loraclr.pipeline import load_with_loras

        t, c = time.perf_counter(), time.process_time()
        model = load_with_loras(str(self.base_dir), [(str(self.specs[name].file), 1.0)],
                                allow_pickle=self.allow_pickle)
        load_s = time.perf_counter() - t
        res, eval_s = self.suite(self.source(model, f"own LoRA {name}"), [name], "single")
        return {"single": res, "load_s": load_s, "eval_s": eval_s, "cpu_s": time.process_time() - c}


def merge_diagnostics(m) -> dict:
    """Hinge activity per stage, converged layers, and ||D|| / ||sum of deltas|| per layer (median, max)."""
    ratios = []
    for key, off in m.offsets.items():
        total = sum(c.delta(key, tuple(off.shape)) for c in m.concepts)
        ratios.append(float(off.norm() / total.norm().clamp_min(1e-12)))
    conv = [r["converged"] for r in m.reports.values() if isinstance(r.get("converged"), bool)]
    used = {k: r for k, r in m.reports.items() if r.get("used", True)}
    return {"hinge": hinge_by_stage(used), "layers": len(m.offsets),
            "converged_fraction": sum(conv) / len(conv) if conv else None,
            "offset_vs_sum_median": float(np.median(ratios)) if ratios else None,
            "offset_vs_sum_max": max(ratios) if ratios else None}


def run_unit(bench: Bench, names, method: str, settings: dict, label: str, layers: str = "all") -> dict:
    """One merge and its evaluation; an error is recorded, not raised (a long run goes on)."""
    unit = {"label": label, "method": method, "settings": settings, "layers": layers, "subset": list(names),
            "n": len(names)}
    try:
        t, c = time.perf_counter(), time.process_time()
        m = bench.merge(names, method, settings, layers)
        unit["merge_s"], unit["merge_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        unit["merge_timings_s"] = dict(m.timings)
        unit["diagnostics"] = merge_diagnostics(m)
        c = time.process_time()
        unit.update(bench.evaluate(m.model(), label, names))
        unit["eval_cpu_s"] = time.process_time() - c
    except Exception:  # noqa: BLE001  (any failure of a method is a result of the benchmark)
        unit["error"] = traceback.format_exc()[-3000:]
    return unit


def run_fingerprint(manifest, base, base_step, sizes: dict) -> dict:
    """What every unit of a run depends on besides its subset and method: --resume and --extend take only
    units made with the same."""
    return {"manifest": str(Path(manifest).resolve()), "base": str(Path(base).resolve()), "base_step": base_step,
            "sizes": sizes}


class Run:
    """The finished units and references of one run, kept in ``partial`` after each (``--resume`` reads it)."""

    def __init__(self, bench: Bench, partial: Path, fingerprint: dict, resume: bool, extend: list[Path] = ()):
        self.bench, self.partial = bench, partial
        self.state: dict = {"fingerprint": fingerprint, "units": {}, "references": {}}
        self.extended: list[dict] = []  # the finished runs taken over by --extend: results file and command
        if resume and partial.is_file():
            old = json.loads(partial.read_text(encoding="utf-8"))
            if old["fingerprint"] != fingerprint:
                raise ValueError(f"{partial}: made with other settings ({old['fingerprint']}); run without --resume")
            self.state = old
            print(f"resuming: {len(old['units'])} units and {len(old['references'])} references done", flush=True)
        for results in extend:
            self.extend(results, fingerprint)

    def extend(self, results: Path, fingerprint: dict) -> None:
        """Take the units and references of a finished run (its ``<out>.json``) made with the same manifest, base
        and sizes, so that this run only adds what it lacks (more N, more methods)."""
        doc = json.loads(results.read_text(encoding="utf-8"))
        m = doc["meta"]
        old = run_fingerprint(m["manifest"], m["base"], m["base_step"], m["sizes"])
        if old != fingerprint:
            raise ValueError(f"--extend {results}: made with other settings ({old}), this run has {fingerprint}")
        units = doc["units"] + ((doc.get("ablations") or {}).get("units") or [])
        added = 0
        for u in units:
            if "error" in u:
                continue
            key = self.key(u["subset"], u["method"], u["settings"], u["layers"])
            if key not in self.state["units"]:
                self.state["units"][key], added = u, added + 1
        for name, r in doc["references"].items():
            self.state["references"].setdefault(name, r)
        self.extended.append({"results": str(results), "command": m["command"]})
        print(f"extending {results}: {added} units and {len(doc['references'])} references taken", flush=True)

    @staticmethod
    def key(names, method: str, settings: dict, layers: str) -> str:
        """A unit's identity: subset, method, the resolved config (a row that repeats a default is merged once)."""
        from loraclr.merge.methods import make_config

        settings, features = split_features(settings)  # the feature run's overrides are part of the unit
        config = dataclasses.asdict(make_config(method, **settings))
        return json.dumps([list(names), method, config, layers] + ([features] if features else []), sort_keys=True)

    def references(self, names) -> None:
        for name in names:
            if name not in self.state["references"]:
                r = self.state["references"][name] = self.bench.reference(name)
                _write_json(self.partial, self.state)
                print(f"  own LoRA {name}: load {r['load_s']:.1f} s, {len(r['single']['images'])} images "
                      f"{r['eval_s']:.1f} s", flush=True)

    def unit(self, names, label: str, method: str, settings: dict, layers: str = "all") -> dict:
        key = self.key(names, method, settings, layers)
        units = self.state["units"]
        if key not in units:
            u = units[key] = run_unit(self.bench, names, method, settings, label, layers)
            _write_json(self.partial, self.state)
            head = f"[{len(units)}] N={len(names)} {','.join(names)} {label}:"
            if "error" in u:
                print(f"{head} FAILED: {u['error'].strip().splitlines()[-1]}", flush=True)
            else:
                ident = stat(single_values(u["single"]["images"])["identity"])
                print(f"{head} merge {u['merge_s']:.1f} s, eval {sum(u['eval_s'].values()):.1f} s "
                      f"({u['n_images']} images), single identity {_f(ident, False)}", flush=True)
        return dict(units[key], label=label)


# --- aggregation ------------------------------------------------------------------------------------------------


def aggregate(units: list[dict], refs: dict[str, dict]) -> dict:
    """Per N and label: pooled single-concept stats, the own-LoRA reference on the same images, identity ratio,
    pooled multi-concept stats, mean merge / evaluation times and hinge activity."""
    ref_by = {image_key(r): r for ref in refs.values() for r in ref["single"]["images"]}
    out: dict = {}
    for u in units:
        if "error" in u:
            continue
        out.setdefault(str(u["n"]), {}).setdefault(u["label"], []).append(u)
    for by_label in out.values():
        for label, us in by_label.items():
            recs = [r for u in us for r in u["single"]["images"]]
            own = [ref_by[image_key(r)] for r in recs]
            sv, ov = single_values(recs), single_values(own)
            pairs = [(float(r["identity"][0]), float(o["identity"][0])) for r, o in zip(recs, own, strict=True)
                     if r["identity"][0] is not None and o["identity"][0] is not None]
            multi = [r for u in us if "multi" in u for r in u["multi"]["images"]]
            mv = multi_values(multi) if multi else None
            hinge = {st: [u["diagnostics"]["hinge"][st] for u in us if u["diagnostics"]["hinge"][st] is not None]
                     for st in STAGES}
            by_label[label] = {
                "subsets": [u["subset"] for u in us],
                "single": {k: stat(sv[k]) for k in METRICS},
                "own": {k: stat(ov[k]) for k in METRICS},
                "identity_ratio": ratio_ci([a for a, _ in pairs], [b for _, b in pairs]),
                "identity_distance_diff": stat(distance_diffs(recs, own)),
                "multi": {k: stat(mv[k]) for k in ("identity", "all_identities", "text", "image")} if mv else None,
                "merge_s": float(np.mean([u["merge_s"] for u in us])),
                "eval_s": float(np.mean([sum(u["eval_s"].values()) for u in us])),
                "images": sum(u["n_images"] for u in us),
                "hinge": {st: float(np.mean(v)) if v else None for st, v in hinge.items()},
                "offset_vs_sum_median": float(np.median([u["diagnostics"]["offset_vs_sum_median"] for u in us])),
            }
    return out


def ablation_row(unit: dict, group: str, value) -> dict:
    row = {"group": group, "value": value, "label": unit["label"], "settings": unit["settings"],
           "layers": unit["layers"], "subset": unit["subset"]}
    if "error" in unit:
        return {**row, "error": unit["error"]}
    sv = single_values(unit["single"]["images"])
    mv = multi_values(unit["multi"]["images"]) if "multi" in unit else None
    return {**row, "single": {k: stat(sv[k]) for k in METRICS},
            "multi": {k: stat(mv[k]) for k in ("identity", "all_identities")} if mv else None,
            "hinge": unit["diagnostics"]["hinge"], "merge_s": unit["merge_s"],
            "eval_s": sum(unit["eval_s"].values()), "offset_vs_sum_median": unit["diagnostics"]["offset_vs_sum_median"]}


def ablation_units(mode: str, quick: bool) -> list[tuple[str, object, dict, str]]:
    """(group, value, settings, layers) per row of the ablation grid: around the official recipe (``paper``) or
    the recommended preset (``converged``)."""
    from loraclr.recipe import RECOMMENDED

    base = {"mode": "paper"} if mode == "paper" else dict(RECOMMENDED["loraclr"])
    grid = QUICK_ABLATIONS if quick else (ABLATIONS if mode == "paper" else CONVERGED_ABLATIONS)
    rows = []
    for group, values in grid.items():
        for v in values:
            if group == "layers":
                rows.append((group, v, dict(base), v))
            elif group == "steps":
                rows.append((group, v, {"mode": "paper", "steps": v}, "all"))  # AdamW steps: paper mode only
            else:
                rows.append((group, v, {**base, group: v}, "all"))
    return rows


# --- output -----------------------------------------------------------------------------------------------------


def _f(s: dict | None, ci: bool = True) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.3f} [{s['low']:.2f}, {s['high']:.2f}]" if ci else f"{s['mean']:.3f}"


def _fd(s: dict | None) -> str:
    """A signed difference with its interval, three decimals (distances differ in the second)."""
    return "-" if s is None else f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"


def _h(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ablation_centre(ab: dict) -> str:
    """The anchor and ridge the converged ablations were run around, from their recorded settings (the preset of
    the time, not today's): a "layers" row carries them unchanged, any other row minus the setting it varies."""
    rows = ab["rows"]
    row = next((r for r in rows if r["group"] == "layers"), rows[0])
    centre = {k: v for k, v in row["settings"].items() if k != row["group"]}
    return f"anchor {centre.get('anchor', 'base')}, ridge {float(centre.get('ridge', 0.0)):g}"


def render(doc: dict) -> str:
    meta, agg = doc["meta"], doc["aggregate"]
    z, ev = meta["sizes"], meta["evaluators"]
    md = [
        "# Merged-concept quality against the number of concepts (LoRACLR Table 1 / Fig. 5), miniature world",
        "",
        f"Manifest `{meta['manifest']}` (LoRAs trained on base step {meta['manifest_base_step']} for "
        f"{meta['lora_steps']} steps), base `{meta['base']}` at step {meta['base_step']} (a private copy). "
        f"{meta['n_identities']} identity concepts; N = "
        f"{', '.join(agg) or '-'} with subsets {json.dumps(meta['subsets'])}. Sampling: {z['steps']} steps, guidance "
        f"{z['guidance']:g}; single suite {z['prompts']} prompts x {z['seeds']} seeds per concept, multi suite up to "
        f"{z['pairs']} pairs + {z['triples']} triples x {z['seeds']} seeds; merge feature run "
        f"{z['feature_steps'] if z['feature_steps'] is not None else 'the merge default'} steps; seed {z['seed']}. Evaluators: {ev['text_image']} / {ev['identity']} (identity threshold "
        f"{ev['identity_threshold']}). Commit {meta['git_commit']}"
        f"{' (dirty)' if meta['git_dirty'] else ''}; `{meta['command']}` ({meta['date_utc']} UTC, "
        f"{meta['threads']} torch thread(s), {meta['nproc']} cores, load average at the end "
        f"{meta['load_average_at_end'][0]:.1f}); this process took {meta['total_s'] / 60:.1f} min."
        + "".join(f" It extends `{x['results']}` (`{x['command']}`), whose finished units it reused (same "
                  "manifest, base and sizes)." for x in meta.get("extends") or []),
        "",
        "Columns: single-concept suite means with bootstrap 95 % intervals over the pooled images of all subsets; "
        "*own* = the same concepts, prompts and seeds drawn with each concept's own LoRA alone (before merging); "
        "merged/own = identity ratio (paired bootstrap); dist - own = mean over images of the identity embedder's "
        "distance to the intended identity minus the own LoRA's on the same image (paired; lower is better; the "
        "continuous value behind the recognised rate, so less noisy); multi = per-region identity and all identities right per "
        "image in the pairs / triples suite; merge / eval = mean seconds per subset; D / sum = median over layers "
        "of the Frobenius norm of the merged offset over that of the naive sum of deltas.",
    ]
    if meta.get("notes"):
        md += [""] + [f"- {n}" for n in meta["notes"]]
    head = ["method", "identity", "own", "merged/own", "dist - own", "text", "own text", "image", "own image", "multi identity",
            "all identities", "merge s", "eval s", "D / sum"]
    for n, by_label in agg.items():
        md += ["", f"## N = {n}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, a in by_label.items():
            s, o, mu = a["single"], a["own"], a["multi"] or {}
            md.append(f"| {label} | {_f(s['identity'])} | {_f(o['identity'], False)} | {_f(a['identity_ratio'])} | "
                      f"{_fd(a.get('identity_distance_diff'))} | {_f(s['text'])} | {_f(o['text'], False)} | {_f(s['image'])} | {_f(o['image'], False)} | "
                      f"{_f(mu.get('identity'))} | {_f(mu.get('all_identities'))} | {a['merge_s']:.1f} | "
                      f"{a['eval_s']:.1f} | {_h(a['offset_vs_sum_median'])} |")
    errors = [u for u in doc["units"] if "error" in u]
    if errors:
        md += ["", "## Failed units", ""]
        md += [f"- N={u['n']} {u['subset']} {u['label']}: {u['error'].strip().splitlines()[-1][:300]}" for u in errors]
    if doc.get("ablations"):
        ab = doc["ablations"]
        md += ["", f"## Ablations (Fig. 8): subset {ab['subset']}, LoRACLR mode {ab['mode']}", "",
               ("One setting varied at a time around the official recipe (margin 0.5, lambda_reg 1e-3, 50 steps, all "
                "layers). " if ab["mode"] == "paper" else
                f"One setting varied at a time around the recommended preset (converged, {_ablation_centre(ab)}, "
                "margin 0.5, lambda_reg 1e-3, all layers). ") + own_line(doc, ab["subset"]) + "Margin 0 switches the contrastive term off. Hinge = mean fraction of active hinge terms per layer of each type "
               "(layers merged by LoRACLR only).", "",
               "| setting | value | identity | text | image | multi identity | all identities | hinge te | "
               "hinge k/v | hinge spatial | merge s | D / sum |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ab["rows"]:
            if "error" in r:
                md.append(f"| {r['group']} | {r['value']} | failed: {r['error'].strip().splitlines()[-1][:150]} |"
                          + " |" * 9)
                continue
            s, mu, h = r["single"], r["multi"] or {}, r["hinge"]
            md.append(f"| {r['group']} | {r['value']} | {_f(s['identity'])} | {_f(s['text'])} | {_f(s['image'])} | "
                      f"{_f(mu.get('identity'))} | {_f(mu.get('all_identities'))} | {_h(h['text_encoder'])} | "
                      f"{_h(h['cross_attention'])} | {_h(h['spatial'])} | {r['merge_s']:.1f} | "
                      f"{_h(r['offset_vs_sum_median'])} |")
    c = doc["cost"]
    md += ["", "## Cost", "",
           f"Seconds per generated and scored image: {c['s_per_image']:.2f} wall, {c['cpu_s_per_image']:.2f} CPU "
           f"(what a quiet core would take); references {c['references_s']:.0f} s, merges {c['merges_s']:.0f} s "
           f"({c['merges_cpu_s']:.0f} CPU s), evaluations {c['evaluations_s']:.0f} s, total {meta['total_s']:.0f} s. "
           "Mean merge seconds (wall) by method and N:", "",
           "| method | " + " | ".join(f"N={n}" for n in c["merge_s"]["ns"]) + " |",
           "|---|" + "---|" * len(c["merge_s"]["ns"])]
    for label, vals in c["merge_s"]["by_label"].items():
        md.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(md) + "\n"


def own_line(doc: dict, subset: list[str]) -> str:
    """The subset's own-LoRA reference (each concept drawn with only its LoRA, same prompts and seeds)."""
    refs = doc.get("references") or {}
    images = [r for name in subset for r in (refs.get(name) or {}).get("single", {}).get("images", [])]
    if not images:
        return ""
    sv = single_values(images)
    return (f"Own LoRAs on the same prompts and seeds (before merging): identity {_f(stat(sv['identity']))}, text "
            f"{_f(stat(sv['text']))}, image {_f(stat(sv['image']))}. ")


def cost(units: list[dict], refs: dict[str, dict]) -> dict:
    ok = [u for u in units if "error" not in u]
    evals = sum(sum(u["eval_s"].values()) for u in ok) + sum(r["eval_s"] for r in refs.values())
    images = sum(u["n_images"] for u in ok) + sum(len(r["single"]["images"]) for r in refs.values())
    ns = sorted({u["n"] for u in ok})
    labels = list(dict.fromkeys(u["label"] for u in ok))
    by_label = {lb: [float(np.mean(v)) if (v := [u["merge_s"] for u in ok if u["label"] == lb and u["n"] == n])
                     else None for n in ns] for lb in labels}
    cpu = sum(u["eval_cpu_s"] for u in ok) + sum(r["cpu_s"] for r in refs.values())
    return {"s_per_image": evals / images if images else float("nan"),
            "cpu_s_per_image": cpu / images if images else float("nan"), "images": images,
            "merges_cpu_s": sum(u.get("merge_cpu_s", 0.0) for u in units),
            "references_s": sum(r["load_s"] + r["eval_s"] for r in refs.values()),
            "merges_s": sum(u.get("merge_s", 0.0) for u in units), "evaluations_s": evals,
            "merge_s": {"ns": ns, "by_label": by_label}}


def plot(doc: dict, prefix: Path) -> list[str]:
    """quality_{identity,text,image}.png: metric vs N per method, the own-LoRA reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = doc["aggregate"]
    ns = sorted(int(n) for n in agg)
    labels = list(dict.fromkeys(lb for by in agg.values() for lb in by))
    files = []
    for metric in METRICS:
        panels = [("single", "single concept")] + ([("multi", "multi concept, per region")] if metric == "identity"
                                                    else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 2.5, 4.5), squeeze=False,
                                 layout="constrained")
        for ax, (suite, title) in zip(axes[0], panels, strict=True):
            for lb in labels:
                pts = [(n, agg[str(n)][lb][suite][metric]) for n in ns
                       if lb in agg[str(n)] and agg[str(n)][lb][suite] and agg[str(n)][lb][suite][metric]]
                if pts:
                    x = [p[0] for p in pts]
                    y = np.array([p[1]["mean"] for p in pts])
                    err = np.array([[p[1]["mean"] - p[1]["low"], p[1]["high"] - p[1]["mean"]] for p in pts]).T
                    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=lb)
            if suite == "single":
                own = [(n, next(iter(agg[str(n)].values()))["own"][metric]) for n in ns if agg[str(n)]]
                own = [(n, s) for n, s in own if s]
                if own:
                    ax.plot([n for n, _ in own], [s["mean"] for _, s in own], "k--", lw=2,
                            label="own LoRA (before merging)")
            ax.set_xlabel("N (concepts merged)")
            ax.set_ylabel(f"{metric} alignment")
            ax.set_title(title)
            ax.set_xticks(ns)
            ax.grid(alpha=0.3)
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
        path = prefix.parent / f"{prefix.name}_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def git_state() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")  # NaN -> ValueError
    os.replace(tmp, path)


# --- driver -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    z = Sizes()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=None, help="concept manifest (default: the world's)")
    ap.add_argument("--base", default="mini", help="base model (default: the built-in mini SD)")
    ap.add_argument("--evaluators", default=None, help="folder of world evaluator weights (default: built-in)")
    ap.add_argument("--ns", nargs="+", type=int, default=None, help="numbers of concepts (default 1 2 5 8 12)")
    ap.add_argument("--subsets", type=int, default=None, help="random subsets per N (default 3; N = all: 1)")
    ap.add_argument("--singles", type=int, default=None, help="concepts drawn for N = 1 (default 4)")
    ap.add_argument("--methods", nargs="+", default=None, help=f"labels (default all): {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {z.steps})")
    ap.add_argument("--guidance", type=float, default=None, help=f"guidance scale (default {z.guidance:g}, the demo's)")
    ap.add_argument("--prompts", type=int, default=None, help=f"single prompts per concept (default {z.prompts})")
    ap.add_argument("--seeds", type=int, default=None, help=f"seeds per prompt (default {z.seeds})")
    ap.add_argument("--pairs", type=int, default=None, help=f"multi-suite pairs (default {z.pairs})")
    ap.add_argument("--triples", type=int, default=None, help=f"multi-suite triples (default {z.triples})")
    ap.add_argument("--feature-steps", type=int, default=None, help=f"merge feature run steps ({z.feature_steps})")
    ap.add_argument("--seed", type=int, default=0, help="subsets, prompts and image seeds")
    ap.add_argument("--ablations", action="store_true", help="also run the Fig. 8 ablations")
    ap.add_argument("--ablations-only", action="store_true", help="the ablations without the N sweep")
    ap.add_argument("--ablation-mode", default="paper", choices=["paper", "converged"])
    ap.add_argument("--ablation-n", type=int, default=5, help="subset size of the ablations (capped)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke sizes: N 1 2, one subset, methods {', '.join(QUICK_METHODS)}, {QUICK_SIZES}")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.partial.json")
    ap.add_argument("--extend", nargs="+", default=None,
                    help="finished runs' .json (same manifest, base, sizes): reuse their units, run only the new "
                         "N / methods / ablations (e.g. to join runs made in parallel)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"),
                    help="results prefix (.json / .md / _*.png)")
    ap.add_argument("--notes", nargs="*", default=[], help="lines for the top of the .md")
    return ap


@dataclasses.dataclass(frozen=True)
class Setup:
    """The run as resolved from the command line."""

    command: str
    sizes: Sizes
    labels: list[str]
    manifest: Path
    specs: list
    ns: list[int]
    subsets: dict[int, list]
    base_dir: Path
    out: Path
    notes: list[str]


def snapshot_base(base_dir: Path, dest: Path, tries: int = 3) -> tuple[Path, dict | None]:
    """A private copy of a base model folder and its training state: the world's mini SD may be rewritten in
    place by a training still running (scripts/train_world.py), which must not change the base between the
    merges of one run. A single-file checkpoint is used where it is."""
    from loraclr.world.model import read_training_state

    if not base_dir.is_dir():
        return base_dir, None
    for _ in range(tries):
        before = read_training_state(base_dir)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            shutil.copytree(base_dir, dest)
        except (FileNotFoundError, shutil.Error):  # the folder was replaced while it was copied
            continue
        if read_training_state(dest) == before == read_training_state(base_dir):
            return dest, before
    raise RuntimeError(f"{base_dir}: it changed during each of {tries} attempts to copy it; try again")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from loraclr.evaluate import load_manifest
    from loraclr.evaluate.concepts import WORLD_MANIFEST
    from loraclr.pipeline import resolve_base

    base = QUICK_SIZES if args.quick else Sizes()
    sizes = Sizes(**{f.name: getattr(args, f.name) if getattr(args, f.name, None) is not None else
                     getattr(base, f.name) for f in dataclasses.fields(Sizes)})
    labels = [x for m in (args.methods or (QUICK_METHODS if args.quick else METHODS)) for x in m.split(",") if x]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    manifest = Path(args.manifest) if args.manifest else WORLD_MANIFEST
    specs = [s for s in load_manifest(manifest) if s.kind == "identity"]
    missing = [str(s.file) for s in specs if s.file is None or not Path(s.file).is_file()]
    if missing:
        raise FileNotFoundError(f"{manifest}: LoRA files missing: {missing} (train them first)")
    names = [s.name for s in specs]
    raw_ns = args.ns or ([1, 2] if args.quick else [1, 2, 5, 8, 12])
    ns = [] if args.ablations_only else sorted({min(n, len(names)) for n in raw_ns if n >= 1})
    notes = list(args.notes)
    if ns and any(n > len(names) for n in raw_ns):
        notes.append(f"N capped at the {len(names)} identity concepts of the manifest (asked for {raw_ns})")
    subsets = draw_subsets(names, ns, args.subsets or (1 if args.quick else 3), args.singles or (1 if args.quick else 4),
                           args.seed)
    setup = Setup("python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv), sizes, labels,
                  manifest, specs, ns, subsets, resolve_base(args.base), Path(args.out), notes)
    setup.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quality-base-") as tmp:
        return execute(args, setup, *snapshot_base(setup.base_dir, Path(tmp) / "base"))


def execute(args, setup: Setup, base_copy: Path, base_state: dict | None) -> int:
    """The sweep, the ablations and the outputs (see the module docstring)."""
    from loraclr.evaluate import load_evaluators

    t_start = time.perf_counter()
    sizes, labels, ns, subsets, out = setup.sizes, setup.labels, setup.ns, setup.subsets, setup.out
    names = [s.name for s in setup.specs]
    notes = list(setup.notes)
    mdoc = json.loads(setup.manifest.read_text(encoding="utf-8"))
    base_step = (base_state or {}).get("step")
    if mdoc.get("base_step") is not None and base_step is not None and mdoc["base_step"] != base_step:
        notes.append(f"the LoRAs were trained on base step {mdoc['base_step']}, the merges use step {base_step}")
    partial = out.with_name(out.name + ".partial.json")
    fingerprint = run_fingerprint(setup.manifest, setup.base_dir, base_step, dataclasses.asdict(sizes))
    t = time.perf_counter()
    evaluators = load_evaluators(folder=args.evaluators)
    bench = Bench(base_copy, setup.specs, evaluators, sizes)
    setup_s = time.perf_counter() - t
    run = Run(bench, partial, fingerprint, args.resume, [Path(x) for x in args.extend or []])
    state = run.state
    plan = [(n, sub, lb) for n in ns for sub in subsets[n] for lb in labels]
    abl_n = min(args.ablation_n, len(names))
    abl_subset = None
    abl_plan: list = []
    if args.ablations or args.ablations_only:
        abl_subset = (subsets.get(abl_n) or draw_subsets(names, [abl_n], 1, 1, args.seed)[abl_n])[0]
        abl_plan = ablation_units(args.ablation_mode, args.quick)
    print(f"{len(names)} identity concepts, N = {ns}, {sum(len(v) for v in subsets.values())} subsets x "
          f"{len(labels)} methods = {len(plan)} merges + {len(abl_plan)} ablation rows; sizes {sizes}; base "
          f"{setup.base_dir} at step {base_step}", flush=True)

    sweep: list[dict] = []
    for n in ns:
        for sub in subsets[n]:
            run.references(sub)
            for label in labels:
                method, settings = METHODS[label]
                sweep.append(run.unit(sub, label, method, settings))
            est = estimate(bench, sweep, state["references"], plan, abl_plan, abl_subset)
            print(f"estimate: about {est / 60:.0f} min more (merge times per concept of the largest N so far, "
                  "scaled linearly in N; evaluations by images)", flush=True)

    ablations = None
    if abl_subset is not None:
        run.references(abl_subset)
        rows, abl_units = [], []
        for group, value, settings, layers in abl_plan:
            u = run.unit(abl_subset, f"loraclr {group}={value}", "loraclr", settings, layers)
            abl_units.append(u)
            rows.append(ablation_row(u, group, value))
        ablations = {"subset": list(abl_subset), "mode": args.ablation_mode, "rows": rows, "units": abl_units}

    refs = dict(sorted(state["references"].items()))
    commit, dirty = git_state()
    ev_info = {"text_image": evaluators.text_image.name,
               "identity": None if evaluators.identity is None else evaluators.identity.name,
               "identity_threshold": None if evaluators.identity is None else evaluators.identity.threshold}
    meta = {
        "command": setup.command, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "extends": run.extended,
        "git_commit": commit, "git_dirty": dirty, "manifest": str(setup.manifest),
        "manifest_base": mdoc.get("base"), "manifest_base_step": mdoc.get("base_step"),
        "manifest_budget": mdoc.get("budget"),
        "lora_steps": sorted({c["steps"] for c in mdoc["concepts"] if c.get("steps") is not None}),
        "base": str(setup.base_dir), "base_step": base_step, "base_training_state": base_state,
        "n_identities": len(names), "concepts": names, "ns": ns,
        "subsets": {str(n): [list(s) for s in v] for n, v in subsets.items()},
        "methods": {lb: {"method": METHODS[lb][0], "settings": METHODS[lb][1]} for lb in labels},
        "sizes": dataclasses.asdict(sizes), "seed": args.seed, "quick": args.quick,
        "evaluators": ev_info, "evaluators_info": evaluators.info, "threads": torch.get_num_threads(),
        "nproc": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "load_average_at_end": list(os.getloadavg()), "setup_s": setup_s,
        "total_s": time.perf_counter() - t_start, "notes": notes,
    }
    doc = {"meta": meta, "aggregate": aggregate(sweep, refs), "ablations": ablations,
           "cost": cost(list(state["units"].values()), refs), "references": refs, "units": sweep}
    plots: list[str] = []
    try:
        plots = plot(doc, out) if doc["aggregate"] else []
    except ImportError:
        notes.append("plots skipped: matplotlib is missing (pip install matplotlib, or the .[plot] extra)")
    meta["plots"] = plots
    md = render(doc)
    _write_json(out.with_suffix(".json"), doc)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    partial.unlink(missing_ok=True)
    print(md)
    return 1 if any("error" in u for u in state["units"].values()) else 0


def estimate(bench: Bench, done: list[dict], refs: dict, plan: list, abl_plan: list, abl_subset) -> float:
    """Seconds left: merges from the measured seconds per concept of each method at the largest N so far (N = 1
    has no negatives, so no active hinge: the contrastive solves get slower with N), evaluations from the
    measured seconds per image (references included)."""
    ok = sorted((u for u in done if "error" not in u), key=lambda u: u["n"])
    images = sum(u["n_images"] for u in ok) + sum(len(r["single"]["images"]) for r in refs.values())
    evals = sum(sum(u["eval_s"].values()) for u in ok) + sum(r["eval_s"] for r in refs.values())
    s_img = evals / max(images, 1)
    per_concept = {u["label"]: u["merge_s"] / u["n"] for u in ok}
    default = max(per_concept.values(), default=1.0)
    seen = {(tuple(u["subset"]), u["label"]) for u in done}
    left = 0.0
    for n, sub, lb in plan:
        if (tuple(sub), lb) not in seen:
            left += per_concept.get(lb, default) * n + bench.n_images(sub) * s_img
    new_concepts = ({c for _, sub, _ in plan for c in sub} | set(abl_subset or ())) - set(refs)
    left += len(new_concepts) * bench.sizes.prompts * bench.sizes.seeds * s_img
    if abl_plan:
        paper = per_concept.get("loraclr-paper", default)
        left += len(abl_plan) * (paper * len(abl_subset) + bench.n_images(abl_subset) * s_img)
    return left


def _quiet_loaders() -> None:
    """No per-load progress bars from diffusers / transformers (hundreds of model loads in a run)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


if __name__ == "__main__":
    _quiet_loaders()
    sys.exit(main())
