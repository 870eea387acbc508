"""Whole-merge speed and memory (issue 3, "Performance"): ``loraclr merge`` per method, per phase, peak RSS.

An SD 1.5-shaped base (real config, random weights) is saved once as a diffusers folder in a cache folder,
so the merge loads it like a user's base; N random rank-16 LoRAs on every default kohya module (192 UNet +
72 text-encoder) are written as real kohya files, each with its own trigger words. Then the full merge
(:func:`loraclr.merging.merge`, the library call behind ``loraclr merge``: load, features, solve, export
with the default outputs) runs once per method, each in a fresh Python process, so the peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` of that process) belongs to that method alone. Phase times come from
the merge's own :class:`~loraclr.merging.MergeSummary` timings.

Methods (labels): ``default`` (loraclr with no settings: what ``loraclr merge`` does by default, the recipe's
``RECOMMENDED`` preset), ``paper`` (loraclr, mode paper: 50 AdamW steps), ``converged`` (loraclr, mode converged),
``lstsq``, ``sum``, and ``paper-official`` / ``converged-official``: the same two modes with the official
feature settings (every row kept (max_rows 0), 20 sampling steps, cross-attention rows = trigger tokens +
end-of-text, text-encoder rows = unpadded tokens), which give the issue's solve comparison on the same
features; far too slow and large for SD 1.5 at 512 px on a CPU, so not in the default list.

    python bench/merge_speed.py                          # N = 12, the default merge and the four methods
    python bench/merge_speed.py --methods sum,converged --n 12
    python bench/merge_speed.py --quick                  # N = 2, 128 px, 2 steps: a smoke run
    python bench/merge_speed.py --quick --size tiny      # tiny model from the test config (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the official code's feature collection: every row (no cap), 20 DPM-Solver steps, trigger + EOT rows for
# cross-attention k/v, unpadded tokens for the text encoder (the resolution is the model's native one)
OFFICIAL_FEATURES = {"max_rows": 0, "steps": 20, "cross_attention_rows": "trigger", "text_encoder_rows": "prompt"}
METHODS = {
    "default": ("loraclr", {}, {}),  # what `loraclr merge` does with a recipe naming no mode (RECOMMENDED)
    "paper": ("loraclr", {"mode": "paper"}, {}),
    "converged": ("loraclr", {"mode": "converged"}, {}),
    "lstsq": ("lstsq", {}, {}),
    "sum": ("sum", {}, {}),
    "paper-official": ("loraclr", {"mode": "paper", "steps": 50}, OFFICIAL_FEATURES),
    "converged-official": ("loraclr", {"mode": "converged"}, OFFICIAL_FEATURES),
}
DEFAULT_METHODS = "default,paper,converged,lstsq,sum"
# distinct nonsense words + a class word: trigger words as users train them (one BPE token or a few)
WORDS = ["sks", "zwx", "qrt", "ohwx", "bjx", "pfk", "vlt", "kqz", "xjm", "wrd", "tgh", "ylp", "dqv", "fzn", "hmc",
         "nkr"]
CLASSES = ["man", "woman", "dog", "cat", "car", "house", "toy", "bird", "chair", "robot", "vase", "hat"]
TARGETS = {"minutes": 10.0, "peak_rss_gb": 12.0, "converged_vs_paper_official_solve": 10.0}


# --- inputs (cached) ---------------------------------------------------------------------------------------


def build_base(cache: Path, size: str, seed: int = 0, family: str = "sd1") -> Path:
    """The base model as a diffusers folder (built once; random weights, real config of ``family``)."""
    base = cache / f"base-{family}-{size}"
    if (base / "model_index.json").is_file():
        return base
    from loraclr.models import build_pipeline

    pipe = build_pipeline(family, size, seed=seed)
    tmp = cache / f".base-{family}-{size}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(base)
    return base


def module_counts(lora: str) -> dict[str, int]:
    """Modules in a kohya file by prefix (lora_unet / lora_te)."""
    from safetensors import safe_open

    with safe_open(lora, framework="pt") as f:
        downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
    return {"unet": sum(k.startswith("lora_unet_") for k in downs),
            "text_encoder": sum(k.startswith("lora_te") for k in downs)}


def build_loras(cache: Path, base: Path, n: int, rank: int, scale: float) -> list[dict]:
    """N random kohya LoRAs on every default target; ||dW|| = scale * ||W0|| per layer. Cached by name."""
    import torch
    from torch import nn

    concepts = [{"name": f"c{i:02d}", "trigger": f"{WORDS[i % len(WORDS)]}{i // len(WORDS) or ''} "
                 f"{CLASSES[i % len(CLASSES)]}"} for i in range(n)]
    paths = [cache / f"lora-{base.name}-r{rank}-s{scale:g}-{i:02d}.safetensors" for i in range(n)]
    for c, p in zip(concepts, paths, strict=True):
        c["lora"] = str(p)
    if all(p.is_file() for p in paths):
        return concepts
    from loraclr.io import save_lora
    from loraclr.lora import LoraLayer
    from loraclr.models import default_lora_targets
    from loraclr.pipeline import family_of, load_base

    pipe = load_base(str(base))
    family = family_of(pipe)  # sd1 or sdxl (build_base's family), for the kohya key layout
    targets = default_lora_targets(pipe)
    for i, p in enumerate(paths):
        if p.is_file():
            continue
        gen = torch.Generator().manual_seed(1000 + i)
        layers = {}
        for key, mod in targets.items():
            w = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
            down = torch.randn(rank, w.shape[1], generator=gen)
            up = torch.randn(w.shape[0], rank, generator=gen)
            factor = (scale * w.norm() / (up @ down).norm()).sqrt()  # alpha = rank: dW = up @ down
            if isinstance(mod, nn.Conv2d):  # 1x1 proj_in / proj_out
                layers[key] = LoraLayer(down=(down * factor)[..., None, None], up=(up * factor)[..., None, None],
                                        alpha=float(rank))
            else:
                layers[key] = LoraLayer(down=down * factor, up=up * factor, alpha=float(rank))
        save_lora(layers, p, format="kohya", family=family, unet_config=dict(pipe.unet.config),  # SDXL kohya names
                  metadata={"ss_tag_frequency": json.dumps({"1_concept": {concepts[i]["trigger"]: 1}})})
    return concepts


# --- one merge, in its own process --------------------------------------------------------------------------


def layer_type(key: str) -> str:
    """``unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2`` -> ``unet ff.net.2``: the component and
    the module's name inside its block, so layers of one kind (and mostly one shape) are counted together."""
    parts = key.split(".")
    for anchor in ("transformer_blocks", "attentions", "layers"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{parts[0]} {'.'.join(parts[i + 2:])}"
    return key


def solve_time_by_type(layers: dict) -> dict:
    """Solve seconds (the per-layer ``time_s`` of the report), layer count and largest single-layer time per
    layer type, slowest type first."""
    out: dict[str, dict] = {}
    for key, r in layers.items():
        t = r.get("time_s")
        if t is None:
            continue
        o = out.setdefault(layer_type(key), {"seconds": 0.0, "layers": 0, "max_s": 0.0})
        o["seconds"] += t
        o["layers"] += 1
        o["max_s"] = max(o["max_s"], t)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["seconds"]))


def spec_recipe(spec: dict):
    """The recipe of one benchmark merge from its spec (base, concepts, method and settings, features and,
    optionally, executor); bench/scale.py builds its merges with it too."""
    from loraclr.recipe import BaseModel, Concept, ExecutorSettings, FeatureSettings, MethodSpec, Recipe

    return Recipe(
        base=BaseModel(spec["base"]),
        concepts=tuple(Concept(name=c["name"], lora=c["lora"], trigger=c["trigger"]) for c in spec["concepts"]),
        method=MethodSpec(spec["method"], spec.get("settings", {})),
        features=FeatureSettings(**spec["features"]),
        executor=ExecutorSettings(**spec.get("executor", {})),
        source="bench",
    )


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from loraclr.merging import merge

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    recipe = spec_recipe(spec)
    t = time.perf_counter()
    s = merge(recipe, spec["out_dir"], progress=True, overwrite=True)
    wall = time.perf_counter() - t
    report = json.loads((Path(spec["out_dir"]) / "report.json").read_text())
    layers = report["layers"].values()
    conv = [r.get("converged") for r in layers]
    hinge = [r["hinge_active"] for r in layers if isinstance(r.get("hinge_active"), int | float)]
    out = {
        "timings_s": s.timings,
        "merge_wall_s": wall,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "rss_after_imports_gb": rss_start / 2**20,
        "n_layers": s.n_layers,
        "layers_not_converged": sum(c is False for c in conv),
        "hinge_active_mean": sum(hinge) / len(hinge) if hinge else None,
        "fidelity_mean": {k: sum(v[k] for v in s.fidelity.values()) / len(s.fidelity)
                          for k in ("merged", "sum")} if s.fidelity else None,
        "solve_s_by_layer_type": solve_time_by_type(report["layers"]),
        "lora_export": s.lora_errors,
        "config": report["config"],
        "threads": torch.get_num_threads(),
    }
    Path(spec["result"]).write_text(json.dumps(out, indent=1))


def run_method(label: str, base: Path, concepts: list[dict], features: dict, threads: int, work: Path) -> dict:
    method, settings, feature_overrides = METHODS[label]
    spec = {
        "base": str(base), "concepts": concepts, "method": method, "settings": settings,
        "features": {**features, **feature_overrides}, "threads": threads,
        "out_dir": str(work / f"out-{label}"), "result": str(work / f"result-{label}.json"),
    }
    spec_path = work / f"spec-{label}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"log-{label}.txt"  # the merge's progress bars: `tail -f` it to follow a long run
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], stdout=log, stderr=log)
    wall = time.perf_counter() - t
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # a 4 GB pipeline per method: do not keep it
    if proc.returncode != 0:
        return {"label": label, "error": log_path.read_text()[-3000:], "returncode": proc.returncode,
                "process_wall_s": wall}
    res = json.loads(Path(spec["result"]).read_text())
    return {"label": label, "method": method, "settings": settings, "features": spec["features"],
            "process_wall_s": wall, **res}


# --- driver ------------------------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x:.2f}"


def table(results: list[dict]) -> list[str]:
    head = ["method", "load s", "features s", "solve s", "export s", "merge total s", "process s", "peak RSS GB",
            "fidelity merged / sum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            last = (r["error"].strip().splitlines() or [f"no output (exit status {r.get('returncode')})"])[-1]
            lines.append(f"| {r['label']} | failed: {last[:200]} |" + " |" * (len(head) - 2))
            continue
        t = r["timings_s"]
        fid = r.get("fidelity_mean")
        fid_s = f"{fid['merged']:.3f} / {fid['sum']:.3f}" if fid else "-"
        lines.append(
            f"| {r['label']} | {t.get('load', 0):.1f} | {t.get('features', 0):.1f} | {t.get('solve', 0):.1f} | "
            f"{t.get('export', 0):.1f} | {sum(t.values()):.1f} | {r['process_wall_s']:.1f} | "
            f"{_gb(r['peak_rss_gb'])} | {fid_s} |"
        )
    return lines


def verdicts(results: list[dict], n: int, full: bool) -> dict:
    ok = {r["label"]: r for r in results if "error" not in r}
    out: dict = {"scope_note": None if full else "not the issue's configuration (see settings): not a verdict"}
    for label, r in ok.items():
        total = sum(r["timings_s"].values())
        out[label] = {"merge_minutes": total / 60, "within_10_min": total <= 60 * TARGETS["minutes"],
                      "peak_rss_gb": r["peak_rss_gb"], "within_12_gb": r["peak_rss_gb"] <= TARGETS["peak_rss_gb"]}
    if "converged" in ok:
        conv = ok["converged"]["timings_s"]["solve"]
        if "paper" in ok:
            out["solve_speedup_converged_vs_paper_default_features"] = ok["paper"]["timings_s"]["solve"] / conv
    if "converged-official" in ok and "paper-official" in ok:
        out["solve_speedup_converged_vs_paper_official_features"] = (
            ok["paper-official"]["timings_s"]["solve"] / ok["converged-official"]["timings_s"]["solve"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="concepts (default 12; --quick: 2)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {sorted(METHODS)}")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.1, help="||dW|| / ||W0|| of every random LoRA layer")
    ap.add_argument("--size", default="real", choices=["real", "tiny"], help="SD 1.5 config or the tiny test one")
    ap.add_argument("--resolution", type=int, default=None, help="features.resolution (default: the merge's)")
    ap.add_argument("--steps", type=int, default=None, help="features.steps (default: the merge's)")
    ap.add_argument("--max-rows", type=int, default=None, help="features.max_rows (default: the merge's)")
    ap.add_argument("--precision", default=None, help="features.precision (default: the merge's)")
    ap.add_argument("--quick", action="store_true", help="N = 2, 128 px, 2 sampling steps (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each merge process")
    ap.add_argument("--cache", default=os.environ.get("LORACLR_BENCH_CACHE", str(Path(tempfile.gettempdir())
                                                                              / "loraclr-bench-cache")))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "merge_speed"),
                    help="results prefix (.json / .md); '' to write nothing")
    ap.add_argument("--append", action="store_true", help="add this run to the results files (else replace)")
    ap.add_argument("--notes", default="", help="free text for the top of the .md (what was and was not run)")
    ap.add_argument("--prepare-only", action="store_true", help="build the cached base and LoRAs, then stop")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    from loraclr.recipe import FeatureSettings

    n = args.n or (2 if args.quick else 12)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    features: dict = {}
    if args.quick:
        features.update(resolution=128, steps=2)
    for name, value in (("resolution", args.resolution), ("steps", args.steps), ("max_rows", args.max_rows),
                        ("precision", args.precision)):
        if value is not None:
            features[name] = value
    resolved = dataclasses.asdict(dataclasses.replace(FeatureSettings(), **features))

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base = build_base(cache, args.size)
    concepts = build_loras(cache, base, n, args.rank, args.scale)
    prep_s = time.perf_counter() - t
    counts = module_counts(concepts[0]["lora"])
    print(f"inputs ready in {prep_s:.0f} s: base {base}, {n} rank-{args.rank} kohya LoRAs", flush=True)
    if args.prepare_only:
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="merge-speed-", dir=cache) as work:
        for label in labels:
            print(f"merging with {label} ...", flush=True)
            r = run_method(label, base, concepts, features, args.threads, Path(work))
            results.append(r)
            print("\n".join(table([r])[2:]), flush=True)

    full = (n == 12 and args.size == "real" and not features and args.rank == 16)
    meta = {
        "command": "python bench/merge_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "nproc": os.cpu_count(),
        "threads_per_merge": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "load_average_at_end": list(os.getloadavg()),
        "model": f"sd1 {args.size} config, random weights, diffusers folder (fp32)",
        "concepts": n, "rank": args.rank, "lora_modules": counts, "lora_scale": args.scale,
        "lora_format": "kohya",
        "triggers": [c["trigger"] for c in concepts],
        "feature_overrides": features,
        "features_default_resolved": resolved,
        "input_preparation_s": prep_s,
        "issue_configuration": full,
        "targets": TARGETS,
    }
    run = {"meta": meta, "results": results, "verdicts": verdicts(results, n, full)}
    print("\n".join(table(results)))
    print(json.dumps(run["verdicts"], indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        runs, notes = [], args.notes
        if args.append and out.with_suffix(".json").is_file():
            old = json.loads(out.with_suffix(".json").read_text())
            runs, notes = old["runs"], args.notes or old.get("notes", "")
        runs.append(run)
        out.with_suffix(".json").write_text(json.dumps({"targets": TARGETS, "notes": notes, "runs": runs}, indent=1))
        out.with_suffix(".md").write_text(render(runs, notes))
    return 1 if any("error" in r for r in results) else 0


def describe(meta: dict) -> str:
    c = meta["lora_modules"]
    return (
        f"{'**The issue configuration.**' if meta['issue_configuration'] else '**Not the issue configuration**.'} "
        f"{meta['model']}; {meta['concepts']} random rank-{meta['rank']} kohya LoRAs on every default kohya "
        f"module ({c['unet']} UNet + {c['text_encoder']} text encoder; ||dW|| = {meta['lora_scale']} ||W0||); "
        f"feature settings {meta['features_default_resolved']} (overrides of the merge's defaults: "
        f"{meta['feature_overrides'] or 'none'}). Each method in its own process with "
        f"{meta['threads_per_merge']} torch threads; {meta['nproc']} CPU cores shared with other jobs (load "
        f"average at the end {meta['load_average_at_end'][0]:.1f}); torch {meta['torch']}. "
        f"Command: `{meta['command']}` ({meta['date_utc']} UTC)."
    )


def render(runs: list[dict], notes: str) -> str:
    md = [
        "# Whole-merge speed and memory: `loraclr merge` per method (issue 3, Performance)",
        "",
        f"Targets (issue 3): the whole {12}-concept merge at default settings <= {TARGETS['minutes']:g} min and "
        f"peak RSS <= {TARGETS['peak_rss_gb']:g} GB on 2 CPU cores; the converged solve >= "
        f"{TARGETS['converged_vs_paper_official_solve']:g}x faster than paper mode the official way (full "
        "feature blocks, 50 AdamW steps) on the same features.",
        "",
        "Phase times (s) from the merge's own summary (`MergeSummary.timings`); merge total = their sum; process "
        "= the whole child process (Python start and imports included); peak RSS = `ru_maxrss` of the merge "
        "process; fidelity = mean over layers and concepts of the relative error of the merged layer on the "
        "concept's own features, merged / naive sum of deltas (lower is better).",
    ]
    if notes:
        md += ["", notes]
    for i, run in enumerate(runs, 1):
        md += ["", f"## Run {i}", "", describe(run["meta"]), "", *table(run["results"]), "",
               "Verdicts: `" + json.dumps(run["verdicts"]) + "`", *by_type_table(run["results"])]
    return "\n".join(md) + "\n"


def by_type_table(results: list[dict], top: int = 6) -> list[str]:
    """Where each method's solve time goes: its ``top`` slowest layer types (runs before this field: none)."""
    rows = [r for r in results if r.get("solve_s_by_layer_type")]
    if not rows:
        return []
    out = ["", f"Solve seconds by layer type (the {top} slowest; layers, largest single layer):", "",
           "| method | " + " | ".join(f"#{k + 1}" for k in range(top)) + " |", "|---|" + "---|" * top]
    for r in rows:
        cells = [f"{k} {v['seconds']:.0f} s ({v['layers']}, {v['max_s']:.1f})"
                 for k, v in list(r["solve_s_by_layer_type"].items())[:top]]
        out.append(f"| {r['label']} | " + " | ".join(cells + ["-"] * (top - len(cells))) + " |")
    return out




if __name__ == "__main__":
    sys.exit(main())
