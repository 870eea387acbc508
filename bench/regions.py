"""Multi-concept images with and without regions, in the miniature world (issue: regional composition).

For each N in ``--ns`` merged identities (N = 2: ``--subsets`` random pairs of concepts; larger N: seeded random
subsets; N = all: one), each method of ``--methods`` merges the subset in memory and draws the world's multi suite
(pairs and, where N >= 3, triples of the subset's concepts, each character scored in its slot's region) in every
mode of ``--modes``:

* ``none``: the global prompt alone ("{a} on the left and {b} on the right at the beach");
* ``attention`` / ``noise``: each character also bound to its scoring region with its own prompt
  ("{a} on the left at the beach"), by the mechanism of that name (:mod:`loraclr.regional`), from
  ``--start`` of the steps on;
* ``<mode>+layout``: the same with the world's layout adapter drawing the boxes (``--structure layout``).

The upper reference ``own-per-region`` draws the same prompts with each region denoised by its own concept's
LoRA alone (noise mode; :class:`loraclr.evaluate.suites.OwnLorasPerRegion`). At N = all the single-concept suite
of each merged model is drawn too (the goal compares regional identity with it).

Per cell, pairs and triples apart: identity per region, the rate of images with every character right, leakage
(a region recognised as another concept), text and image alignment, with bootstrap 95 % intervals; and the
sampling time per image against plain sampling of the same model in the same process.

Units (one merged model, all its modes) are written to ``<out>.partial/`` as they finish; a rerun skips them, so
``--shard K/M`` splits the work between processes (one torch thread each) and ``--report`` joins them into
``<out>.json``, ``<out>.md`` and ``<out>.png``.

    python bench/regions.py --shard 0/2 & python bench/regions.py --shard 1/2; python bench/regions.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # label -> (registry name, settings); "default" is the recommended preset of `loraclr merge`
    "default": ("loraclr", {}),
    "average": ("average", {}),
    "lstsq": ("lstsq", {}),
    "sum": ("sum", {}),
}
REFERENCE = "own-per-region"


def draw_subsets(names: list[str], n: int, count: int, seed: int) -> list[tuple[str, ...]]:
    """``count`` seeded distinct subsets of ``n`` names (one when n is all of them), in manifest order."""
    if n >= len(names):
        return [tuple(names)]
    rng = np.random.default_rng([seed, 73, n])
    out: list[tuple[str, ...]] = []
    while len(out) < min(count, math.comb(len(names), n)):
        pick = tuple(names[i] for i in sorted(rng.choice(len(names), n, replace=False)))
        if pick not in out:
            out.append(pick)
    return out


def stat(values: list[float]) -> dict | None:
    """Mean with a bootstrap 95 % interval over the values (images), or None without values."""
    from loraclr.evaluate.metrics import summary

    return summary(values)


def summarise(records: list[dict]) -> dict:
    """Pairs and triples apart: identity per region, all characters right, leakage, text, image."""
    out = {}
    for label, k in (("pairs", 2), ("triples", 3)):
        rs = [r for r in records if len(r["concepts"]) == k]
        if not rs:
            continue
        regions = [(i, o) for r in rs for i, o in zip(r["identity"], r.get("shows_other", [None] * k), strict=True)
                   if i is not None]
        out[label] = {
            "identity": stat([float(i) for i, _ in regions]),
            "all_right": stat([float(all(r["identity"])) for r in rs if None not in r["identity"]]),
            "leakage": stat([float(o is not None) for _, o in regions]),
            "text": stat([r["text"] for r in rs]),
            "image": stat([float(np.mean(r["image"])) for r in rs]),
            "images": len(rs),
        }
    return out


# --- running -------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args):
        from loraclr.evaluate import Scorer, load_evaluators, load_manifest
        from loraclr.evaluate.concepts import WORLD_MANIFEST

        self.args = args
        self.specs = {s.name: s for s in load_manifest(args.manifest or WORLD_MANIFEST) if s.kind == "identity"}
        self.ev = load_evaluators()
        self.scorer = Scorer(self.ev, list(self.specs.values()))
        self.structure = None

    def recipe(self, names, method: str):
        from loraclr.recipe import recipe_from_dict

        name, settings = METHODS[method]
        return recipe_from_dict({
            "base": "mini", "method": {"name": name, **settings}, "allow_pickle": True,
            "concepts": [{"name": s.name, "lora": str(s.file), "trigger": s.trigger,
                          "prompts": [s.prompt_phrase("{trigger}"), "{trigger}"]}
                         for s in (self.specs[n] for n in names)],
        }, source=f"bench regions ({method})")

    def suite(self, source, names, suite: str, mode: str | None) -> tuple[dict, float]:
        from loraclr.evaluate import run_suite

        a = self.args
        regional = None if mode in (None, "none") else mode.split("+")[0]
        source.structure = self.layout() if mode and mode.endswith("+layout") else None
        if regional is None and source.structure is not None:
            raise ValueError("the layout adapter draws the region boxes: use it with a region mode")
        t = time.perf_counter()
        res = run_suite(source, [self.specs[n] for n in names], self.ev, suite, scorer=self.scorer,
                        n_prompts=a.prompts, seeds=a.seeds, seed=a.seed, n_pairs=a.pairs,
                        n_triples=a.triples if len(names) >= 3 else 0, progress=False,
                        **({"regions": regional, "region_start": a.start} if suite == "multi" else {}))
        return res, time.perf_counter() - t

    def layout(self):
        if self.structure is None:
            from loraclr.structure import load_structure

            self.structure = load_structure("layout")
        return self.structure

    def unit(self, n: int, k: int, names, method: str) -> dict:
        """One merged model (or the reference) and every mode: the multi suite's records and timings."""
        from loraclr.evaluate.suites import OwnLorasPerRegion, PipelineSource
        from loraclr.merging import merge_model

        a = self.args
        out: dict = {"n": n, "subset": k, "concepts": list(names), "method": method, "modes": {},
                     "argv": sys.argv[1:], "settings": {k_: v for k_, v in vars(a).items() if k_ != "out"}}
        t = time.perf_counter()
        if method == REFERENCE:
            source = OwnLorasPerRegion("mini", [self.specs[x] for x in names], allow_pickle=True)
            modes = reference_modes(a.modes)
        else:
            model = merge_model(self.recipe(names, method), progress=False).model()
            source = PipelineSource(model, method)
            modes = a.modes
        out["merge_s"] = time.perf_counter() - t
        for mode in modes:
            res, secs = self.suite(source, names, "multi", mode)
            out["modes"][mode] = {"records": res["images"], "seconds": secs, "images": len(res["images"])}
        if method != REFERENCE and n == len(self.specs) and "none" in modes:
            res, secs = self.suite(source, names, "single", None)
            out["single"] = {"records": res["images"], "seconds": secs}
        return out


def units(args, names: list[str]) -> list[tuple[int, int, tuple[str, ...], str]]:
    out = []
    for n in args.ns:
        n = min(n, len(names))
        for k, subset in enumerate(draw_subsets(names, n, args.subsets if n == 2 else args.large_subsets, args.seed)):
            for method in [*args.methods, *([REFERENCE] if args.reference else [])]:
                out.append((n, k, subset, method))
    return out


def reference_modes(modes: list[str]) -> list[str]:
    """The reference draws each region with its own weights: the noise mode, with the layout where asked."""
    return ["noise+layout"] if any(m.endswith("+layout") for m in modes) else ["noise"]


def unit_path(args, u) -> Path:
    n, k, _, method = u
    modes = "_".join(reference_modes(args.modes) if method == REFERENCE else args.modes)
    return Path(str(args.out) + ".partial") / f"n{n}-s{k}-{method}-{modes}.json"


def timing(args) -> dict:
    """Sampling seconds per image of one merged model, plain and in each mode, back to back in this process."""
    from loraclr.evaluate import load_manifest
    from loraclr.evaluate.concepts import WORLD_MANIFEST
    from loraclr.merging import merge_model
    from loraclr.pipeline import generate
    from loraclr.regional import Region, RegionalPlan

    r = Runner(args)
    names = [s.name for s in load_manifest(args.manifest or WORLD_MANIFEST) if s.kind == "identity"][:2]
    model = merge_model(r.recipe(names, "default"), progress=False).model()
    a, b = ("{" + n + "}" for n in names)
    prompt = f"{a} on the left and {b} on the right at the beach"
    regions = (Region((0, 0.25, 0.5, 1), f"{a} on the left at the beach"),
               Region((0.5, 0.25, 1, 1), f"{b} on the right at the beach"))
    out = {}
    generate(model, [prompt], n=1, progress=False)  # warm-up
    for _ in range(args.timing_rounds):
        for mode in ("none", "attention", "noise"):
            plan = None if mode == "none" else RegionalPlan(regions, mode=mode, start=0.0)
            t = time.perf_counter()
            generate(model, [prompt], n=args.timing_images, seed=500, progress=False, regions=plan)
            out.setdefault(mode, []).append((time.perf_counter() - t) / args.timing_images)
    best = {m: min(v) for m, v in out.items()}
    return {"seconds_per_image": best, "ratio": {m: best[m] / best["none"] for m in best},
            "what": f"best of {args.timing_rounds} rounds of {args.timing_images} images, 25 steps, regions at "
                    "every step (the most work), one torch thread"}


# --- report --------------------------------------------------------------------------------------------------


def fmt(s: dict | None) -> str:
    return "-" if s is None else f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def report(args, all_units: list[dict], timing_res: dict | None) -> tuple[dict, str]:
    # the runs' own settings, not the report call's
    args = argparse.Namespace(**{**vars(args), **all_units[0].get("settings", {})})
    commands = sorted({" ".join(u.get("argv", [])) for u in all_units})
    cells: dict = {}
    singles: dict = {}
    for u in all_units:
        for mode, m in u["modes"].items():
            cells.setdefault((u["n"], u["method"], mode), []).extend(m["records"])
        if "single" in u:
            singles[u["method"]] = u["single"]["records"]
    table = {f"{n}|{method}|{mode}": summarise(recs) for (n, method, mode), recs in sorted(cells.items())}
    single = {m: stat([float(x) for r in recs for x in r["identity"] if x is not None]) for m, recs in singles.items()}
    lines = [
        "# Multi-concept images with regions (miniature world)\n",
        "Commands: " + "; ".join(f"`python bench/regions.py {c}`" for c in commands) +
        f", joined by `python bench/regions.py --report`; commit {git_commit()}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}.\n",
        f"Merged N: {args.ns} (N = 2: {args.subsets} random pairs of concepts; other N: {args.large_subsets} "
        f"subset(s); N = all: one). Per subset {args.pairs} pair prompts and {args.triples} triple prompts (N >= 3) "
        f"x {args.seeds} seeds, seed {args.seed}; 25 steps, guidance 7.5. Region prompts '{{c}} on the left "
        f"at the beach'; boxes = the evaluator's scoring regions; regions from {args.start:.0%} of the steps.\n",
        "Cells: identity per region / all characters right / leakage (a region recognised as another concept) / "
        "text alignment; bootstrap 95 % intervals over regions or images.\n",
    ]
    for label in ("pairs", "triples"):
        lines.append(f"\n## {label.capitalize()}\n")
        lines.append("| N | method | mode | images | identity per region | all right | leakage | text | image |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for key, s in table.items():
            if label not in s:
                continue
            n, method, mode = key.split("|")
            c = s[label]
            lines.append(f"| {n} | {method} | {mode} | {c['images']} | {fmt(c['identity'])} | "
                         f"{fmt(c['all_right'])} | {fmt(c['leakage'])} | {fmt(c['text'])} | {fmt(c['image'])} |")
    if single:
        lines.append("\n## Single-concept identity of the same merged models (N = all)\n")
        lines.append("| method | identity |\n|---|---|")
        lines += [f"| {m} | {fmt(s)} |" for m, s in single.items()]
    if timing_res:
        lines.append("\n## Sampling cost per image (same model, same process)\n")
        lines.append("| mode | seconds per image | x plain |\n|---|---|---|")
        for m, sec in timing_res["seconds_per_image"].items():
            lines.append(f"| {m} | {sec:.2f} | {timing_res['ratio'][m]:.2f} |")
        lines.append(f"\n{timing_res['what']}.")
    return {"settings": vars(args) | {"out": str(args.out)}, "cells": table, "single_identity": single,
            "timing": timing_res, "commit": git_commit()}, "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[plot]')")
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, label in enumerate(("pairs", "triples")):
        for row, metric in enumerate(("identity", "all_right")):
            ax = axes[row, col]
            series: dict = {}
            for key, s in result["cells"].items():
                n, method, mode = key.split("|")
                if label in s and s[label][metric] is not None:
                    series.setdefault(f"{method} / {mode}", []).append((int(n), s[label][metric]["mean"]))
            methods = sorted({name.split(" / ")[0] for name in series})
            colours = {m: ("black" if m == REFERENCE else plt.cm.tab10(i)) for i, m in enumerate(methods)}
            styles = {"none": ":", "attention": "-", "noise": "--"}  # + layout: the same line with square marks
            for name, pts in sorted(series.items()):
                pts.sort()
                method, mode = name.split(" / ")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(mode.split("+")[0], "-"),
                        color=colours[method], marker="s" if mode.endswith("+layout") else "o", markersize=4,
                        label=name)
            ax.set_title(f"{label}: {'identity per region' if metric == 'identity' else 'all characters right'}")
            ax.set_ylim(0, 1)
            ax.set_xlabel("merged concepts N")
    axes[0, 1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", type=int, nargs="+", default=[2, 5, 12])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--modes", nargs="+", default=["none", "attention", "noise"])
    p.add_argument("--start", type=float, default=None, help="fraction of the steps before regions act "
                   "(default: loraclr.regional.DEFAULT_START)")
    p.add_argument("--subsets", type=int, default=12, help="random pairs at N = 2")
    p.add_argument("--large-subsets", type=int, default=1, help="random subsets at 2 < N < all")
    p.add_argument("--pairs", type=int, default=16, help="pair prompts per subset (N >= 3)")
    p.add_argument("--triples", type=int, default=8, help="triple prompts per subset (N >= 3)")
    p.add_argument("--prompts", type=int, default=2, help="single-suite prompts per concept (N = all)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help=f"skip the {REFERENCE} reference (e.g. in a second run that adds modes)")
    p.add_argument("--seed", type=int, default=1000, help="first seed (the defaults were chosen on seeds 0-3)")
    p.add_argument("--manifest")
    p.add_argument("--shard", default="0/1", help="K/M: run every M-th unit from K")
    p.add_argument("--timing", action="store_true", help="measure sampling cost per image (in this process)")
    p.add_argument("--timing-images", type=int, default=8)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--report", action="store_true", help="join the finished units into the results files")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "regions")
    args = p.parse_args(argv)
    from loraclr.regional import DEFAULT_START

    args.start = DEFAULT_START if args.start is None else args.start
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = None
    if not args.report or args.timing:
        from loraclr.evaluate import load_manifest
        from loraclr.evaluate.concepts import WORLD_MANIFEST

        names = [s.name for s in load_manifest(args.manifest or WORLD_MANIFEST) if s.kind == "identity"]
    timing_path = Path(str(args.out) + ".partial") / "timing.json"
    if args.timing:
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        res = timing(args)
        timing_path.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    if args.report:
        done = [json.loads(f.read_text()) for f in sorted(Path(str(args.out) + ".partial").glob("n*.json"))]
        if not done:
            raise SystemExit(f"no finished units under {args.out}.partial")
        result, md = report(args, done, json.loads(timing_path.read_text()) if timing_path.is_file() else None)
        Path(str(args.out) + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(str(args.out) + ".md").write_text(md)
        plot(result, Path(str(args.out) + ".png"))
        print(md)
        return 0
    k, m = (int(x) for x in args.shard.split("/"))
    todo = [u for i, u in enumerate(units(args, names)) if i % m == k]
    runner = Runner(args)
    for u in todo:
        path = unit_path(args, u)
        if path.is_file():
            continue
        t = time.perf_counter()
        res = runner.unit(*u)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)  # a killed run leaves no half unit
        print(f"{path.name}: {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
