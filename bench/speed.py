"""Merge speed and memory (issue 5): per method, per phase, and how both scale with the number of concepts N.

Baselines, measured in the same run as the methods they are compared with (absolute seconds drift on a shared
machine, ratios much less): LoRACLR ``paper`` mode the official way (full feature blocks, 50 AdamW steps)
and an L-BFGS least-squares fusion as Mix-of-Show runs it (:func:`lbfgs_fit`). Two parts, each optional:

``whole``  ``loraclr merge`` end to end (load, features, solve, export) per family x N x method, each merge in
           its own process so its peak RSS is its own. Inputs and workers are ``bench/merge_speed.py``'s: the
           family's real config with random weights, N random rank-16 kohya LoRAs on every default kohya
           module. Phase times come from the merge's own summary.
``solve``  the solve phase alone, per layer shape: one layer of each distinct (component, weight shape)
           among the family's default kohya modules, with random W0, rows and rank-16 deltas at that shape
           (``bench/solve_speed.py``'s generator) and ``--rows`` rows per concept. Its time multiplied by
           the number of layers of that shape, summed, is a whole-model *estimate* of the solve phase (an
           extrapolation: same shape, same cost). Methods: ``sum``, ``lstsq``, ``converged`` (library
           solvers, median of ``--repeat`` runs), ``paper`` (50 x its median AdamW step over
           ``--paper-steps`` run) and ``lbfgs`` (500 x its time per L-BFGS iteration over ``--lbfgs-steps``
           run). Memory: the solve's peak RSS above the RSS just before it, per layer (the kernel's peak
           counter VmHWM is reset through /proc/self/clear_refs before each solve; tracemalloc does not
           see torch's allocations).

    python bench/speed.py --quick                        # tiny configs, both parts, seconds
    python bench/speed.py --part solve --families sd1,sdxl --n 2,6,12,50 --rows 256
    python bench/speed.py --part whole --families sd1 --n 2,6,12 --methods sum,converged --baseline paper
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from loraclr.recipe import RECOMMENDED, FeatureSettings

HERE = Path(__file__).resolve().parent
PAPER_STEPS = 50  # the official LoRACLR optimisation: 50 AdamW steps per layer
LBFGS_STEPS = 500  # Mix-of-Show gradient fusion: optimize_textenc_iters (its UNet setting is 50)
SOLVE_METHODS = ("sum", "lstsq", "converged", "default", "paper", "lbfgs")
BASELINES = ("paper", "lbfgs")
FAST = ("lstsq", "converged", "default")  # compared against each baseline


def _load(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- the L-BFGS baseline (Mix-of-Show gradient fusion) -------------------------------------------------------


def fusion_targets(W0: Tensor, deltas: list[Tensor], X: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stacked inputs and recorded outputs of all concepts: K = [X_1; ...; X_N] (sum n_i, in) and
    V = [X_1 (W0 + dW_1)^T; ...] (sum n_i, out), as Mix-of-Show records them with each concept's LoRA merged."""
    with torch.no_grad():
        K = torch.cat(X)
        V = torch.cat([x @ (W0 + d).T for x, d in zip(X, deltas, strict=True)])
    return K, V


def lbfgs_fit(K: Tensor, V: Tensor, W0: Tensor, iters: int, history_size: int = 25,
              max_eval: int | None = None) -> tuple[Tensor, dict]:
    """min_W ||K W^T - V||^2 / (rows x out) by L-BFGS from W0: Mix-of-Show's ``update_quasi_newton``
    (Gu et al. 2023, ``gradient_fusion.py``): lr 1, history 25, strong-Wolfe line search, tolerances 1e-16
    (so it runs until ``iters`` iterations or ``max_eval`` loss evaluations, torch's default 1.25 x iters, which
    the line search's extra evaluations can reach first), keeping the W of the lowest loss seen. The same
    objective as ``lstsq`` (sum_i ||X_i W^T - X_i (W0 + dW_i)^T||^2), solved iteratively.

    Returns (W - W0, report with ``loss`` (best mean squared error), ``iterations``, ``evaluations``).
    """
    W = W0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W], lr=1, max_iter=iters, max_eval=max_eval, history_size=history_size,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-16, tolerance_change=1e-16)
    best = {"loss": math.inf, "W": W0.detach().clone(), "evals": 0}

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(K, W), V)
        best["evals"] += 1
        value = float(loss.detach())
        if value < best["loss"]:
            best["loss"], best["W"] = value, W.detach().clone()
        loss.backward()
        return loss

    opt.step(closure)
    iterations = opt.state[W].get("n_iter", 0)
    return best["W"] - W0, {"loss": best["loss"], "iterations": iterations, "evaluations": best["evals"]}


# --- memory -------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory (MB) of a block above the RSS at its start; None where Linux's peak counter cannot
    be reset. Freed heap is handed back first (malloc_trim) so earlier layers' garbage does not hide it."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
            self.ok = self.start is not None
        except OSError:
            self.ok = False
        self.mb = None
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        if self.ok and hwm is not None:
            self.mb = max(0.0, (hwm - self.start) / 1024)
        return False


# --- timed solves: one signature, found by name ---------------------------------------------------------------


class Timed(NamedTuple):
    seconds: float  # the full solve's time: measured, or official steps x measured time per step
    measured_s: float  # wall time actually spent
    steps_run: int | None  # steps / iterations actually run (None: a closed-form solve)
    steps_official: int | None
    offset: Tensor  # D (out, in)
    loss: float | None  # the method's own objective at its result
    info: dict | None = None  # method-specific counts (L-BFGS iterations and evaluations)

    @property
    def extrapolated(self) -> bool:
        return self.steps_run is not None and self.steps_run < self.steps_official


def _closed_form(method: str, cfg: dict | None) -> Callable:
    def run(problem, args) -> Timed:
        t, r = SS.timed(problem, method, cfg, args.repeat)
        return Timed(t, t * args.repeat, None, None, r.offset, r.report.get("loss"))

    return run


def _paper(problem, args) -> Timed:
    t, wall, r = SS.timed_paper(problem, args.paper_steps)  # 50 x median step
    return Timed(t, wall, args.paper_steps, PAPER_STEPS, r.offset, r.report.get("loss"))


def _lbfgs(problem, args) -> Timed:
    """Mix-of-Show's run: 500 iterations, at most 625 loss evaluations (torch's default max_eval). Fewer
    iterations run: time = setup + time per evaluation x the evaluations the full run would make,
    min(625, 500 x evaluations per iteration measured), with the short run's evaluation cap lifted so its
    iterations are complete ones."""
    t0 = time.perf_counter()
    K, V = fusion_targets(problem.W0, list(problem.deltas), problem.X)
    setup = time.perf_counter() - t0
    k = min(args.lbfgs_steps, LBFGS_STEPS)
    t1 = time.perf_counter()
    D, rep = lbfgs_fit(K, V, problem.W0, k, max_eval=None if k == LBFGS_STEPS else 4 * k)
    fit = time.perf_counter() - t1
    it, ev = rep["iterations"], rep["evaluations"]
    if k == LBFGS_STEPS or it < k:  # the official run, or a short one that stopped on its own: measured
        return Timed(setup + fit, setup + fit, LBFGS_STEPS, LBFGS_STEPS, D, rep["loss"], rep)
    evals_full = min(LBFGS_STEPS * 5 // 4, LBFGS_STEPS * ev / it)
    rep = {**rep, "evaluations_full_run_estimate": evals_full}
    return Timed(setup + fit / ev * evals_full, setup + fit, it, LBFGS_STEPS, D, rep["loss"], rep)


SOLVERS: dict[str, Callable] = {
    "sum": _closed_form("sum", None),
    "lstsq": _closed_form("lstsq", None),
    "converged": _closed_form("loraclr", {"mode": "converged"}),
    "default": _closed_form("loraclr", dict(RECOMMENDED["loraclr"])),  # what `loraclr merge` runs by default
    "paper": _paper,
    "lbfgs": _lbfgs,
}
SS = None  # bench/solve_speed.py, loaded in main (problem generator, timers)


def lsq_mse(problem, D: Tensor) -> float:
    """The least-squares objective every method is scored on: sum_i ||X_i (D - dW_i)^T||^2 / (rows x out)."""
    with torch.no_grad():
        err = sum(float((x @ (D - d).T).pow(2).sum()) for x, d in zip(problem.X, problem.deltas, strict=True))
    return err / (problem.W0.shape[0] * sum(x.shape[0] for x in problem.X))


# --- solve part ----------------------------------------------------------------------------------------------


OFFICIAL_TIMESTEPS = 20  # the official feature run: 20 DPM-Solver steps at the native resolution
OFFICIAL_TE_ROWS = 176  # text encoder: (7 + 4) tokens x 16 layer-wise prompts (bench/solve_speed.py)
OFFICIAL_KV_ROWS = 6  # cross-attention k / v: 3 positions (trigger tokens + end-of-text) x 2 prompts


def official_rows(key: str, unet_config: dict, timesteps: int) -> int:
    """Rows per concept that the official feature collection records at layer ``key``: the text encoder's and
    cross-attention k/v's token rows, and for every other UNet layer its block's latent positions at the
    native resolution (``sample_size``: 64 for SD 1.5, 128 for SDXL) x ``timesteps`` sampling steps."""
    if not key.startswith("unet."):
        return OFFICIAL_TE_ROWS
    if ".attn2.to_k" in key or ".attn2.to_v" in key:
        return OFFICIAL_KV_ROWS
    levels = len(unet_config["down_block_types"])
    m = re.match(r"unet\.(down|up)_blocks\.(\d+)\.", key)
    if m:
        depth = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
    elif key.startswith("unet.mid_block."):
        depth = levels - 1
    else:
        raise ValueError(f"official_rows: no block resolution for layer {key!r}")
    side = unet_config["sample_size"] // 2**depth
    return side * side * timesteps


def layer_shapes(family: str, size: str, timesteps: int | None = None) -> list[dict]:
    """One entry per distinct (component, flattened weight shape) of the default kohya modules, with its
    first key and how many modules share it (from the config on the meta device: no weights). With
    ``timesteps``, also per distinct official row count (:func:`official_rows`), kept as ``rows``."""
    from loraclr.models import build_components, default_lora_targets

    comps = build_components(family, size, device="meta", with_vae=False)
    unet_config = dict(comps["unet"].config)
    groups: dict[tuple, dict] = {}
    for key, mod in default_lora_targets(comps).items():
        w = mod.weight  # Linear (out, in) or 1x1 Conv2d (out, in, 1, 1): flattened to (out, in)
        rows = None if timesteps is None else official_rows(key, unet_config, timesteps)
        sig = (key.split(".")[0], int(w.shape[0]), int(w[0].numel()), rows)
        g = groups.setdefault(sig, {"key": key, "component": sig[0], "out": sig[1], "in": sig[2], "count": 0,
                                    **({} if rows is None else {"rows": rows})})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: (g["component"], g["in"] * g["out"], g.get("rows", 0)))


def _predict(history: list[tuple[int, float]], n: int) -> float | None:
    """Wall time of a cell at N = n from the same layer and method at smaller N: a power law through the last
    two measurements (exponent clipped to [0, 2]), linear from one. None without any."""
    if not history:
        return None
    n2, t2 = history[-1]
    e = 1.0
    if len(history) > 1 and history[-2][0] != n2 and history[-2][1] > 0 and t2 > 0:
        n1, t1 = history[-2]
        e = min(2.0, max(0.0, math.log(t2 / t1) / math.log(n2 / n1)))
    return t2 * (n / n2) ** e


def run_solve(family: str, args) -> dict:
    shapes = layer_shapes(family, args.size, args.timesteps if args.rows == "official" else None)
    if args.shapes:  # a subset, e.g. to fill in cells a budgeted run left out (then not a whole-model estimate)
        shapes = [s for s in shapes if any(w in s["key"] for w in args.shapes.split(","))]
    print(f"{family}: {len(shapes)} layer shapes, {sum(s['count'] for s in shapes)} modules", flush=True)
    cells, history = [], {}
    for si, s in enumerate(shapes):
        for n in args.ns:
            rows = s.get("rows", args.rows)
            problem = SS.make_problem(s["key"], s["in"], s["out"], rows, n, args.rank, seed=1000 * si + n,
                                      factors=args.deltas == "factors")
            d_mb = sum(t.numel() * t.element_size() for t in
                       (problem.deltas.ups + problem.deltas.downs if args.deltas == "factors" else problem.deltas))
            inputs_mb = (d_mb + sum(t.numel() * t.element_size() for t in [problem.W0, *problem.X])) / 2**20
            for m in args.solve_methods:
                cell = {"shape": s["key"], "N": n, "method": m, "rows": rows, "inputs_mb": inputs_mb}
                hist = history.setdefault((s["key"], m), [])
                pred = _predict(hist, n)
                if args.max_cell_s and pred is not None and pred > args.max_cell_s:
                    # too slow to run here: scale the last measured full-solve time like its wall time
                    last = next(c for c in reversed(cells) if c["shape"] == s["key"] and c["method"] == m
                                and "predicted_wall_s" not in c)
                    cell.update(seconds=last["seconds"] * pred / last["measured_s"], measured_s=None,
                                predicted_wall_s=pred, extrapolated=True, peak_rss_mb=None, steps_run=0)
                    cells.append(cell)
                    print(f"  {s['key']} N={n} {m}: not run (predicted {pred:.0f} s > --max-cell-s)", flush=True)
                    continue
                with PeakRSS() as mem:
                    r = SOLVERS[m](problem, args)
                hist.append((n, r.measured_s))
                cell.update(seconds=r.seconds, measured_s=r.measured_s, extrapolated=r.extrapolated,
                            steps_run=r.steps_run, steps_official=r.steps_official, peak_rss_mb=mem.mb,
                            loss=r.loss, lsq_mse=lsq_mse(problem, r.offset), info=r.info)
                cells.append(cell)
                print(f"  {s['key']} ({s['out']}x{s['in']}, x{s['count']}, {rows} rows) N={n} {m}: {r.seconds:.3g} s"
                      f"{' (extrapolated)' if r.extrapolated else ''}, wall {r.measured_s:.3g} s, peak "
                      f"{mem.mb if mem.mb is None else round(mem.mb)} MB", flush=True)
            del problem
    return {"shapes": shapes, "cells": cells, "summary": summarize(shapes, cells, args.ns, args.solve_methods)}


def lbfgs_unallocated_mb(cell: dict, shape: dict, history_size: int = 25) -> float:
    """Memory a short L-BFGS run did not reach: torch keeps up to ``history_size`` (s, y) pairs of the weight's
    size, one pair per iteration after the first, so a run of a few iterations under-reports the full run's
    peak by the pairs it never stored (fp32). 0 for other methods."""
    if cell["method"] != "lbfgs" or not cell.get("info"):
        return 0.0
    stored = min(history_size, max(0, cell["info"]["iterations"] - 1))
    return 2 * (history_size - stored) * shape["out"] * shape["in"] * 4 / 2**20


def summarize(shapes: list[dict], cells: list[dict], ns: list[int], methods: list[str]) -> dict:
    """Whole-model solve estimates per N and method (sum over shapes of seconds x layer count), the ratios
    against each baseline, and scaling with N against the smallest N."""
    count = {s["key"]: s["count"] for s in shapes}
    shape = {s["key"]: s for s in shapes}
    by = {(c["shape"], c["N"], c["method"]): c for c in cells}
    est: dict[str, dict] = {}
    for n in ns:
        row = {}
        for m in methods:
            cs = [by[(s["key"], n, m)] for s in shapes if (s["key"], n, m) in by]
            if len(cs) != len(shapes):
                continue
            mems = [c["peak_rss_mb"] + lbfgs_unallocated_mb(c, shape[c["shape"]]) for c in cs
                    if c["peak_rss_mb"] is not None]
            row[m] = {"seconds": sum(c["seconds"] * count[c["shape"]] for c in cs),
                      "measured_s": sum(c["measured_s"] or 0 for c in cs),
                      "extrapolated_from_steps": any(c["extrapolated"] and c["measured_s"] for c in cs),
                      "predicted_not_run": sum(c["measured_s"] is None for c in cs),
                      "peak_rss_mb_max": max(mems) if mems else None}
        ratios = {f"{b}/{m}": row[b]["seconds"] / row[m]["seconds"] for b in BASELINES for m in FAST
                  if b in row and m in row and row[m]["seconds"] > 0}
        est[str(n)] = {"methods": row, "ratios": ratios}
    n0 = str(min(ns))
    scaling = {}
    for n in ns:
        scaling[str(n)] = {}
        for m in methods:
            a, b = est[n0]["methods"].get(m), est[str(n)]["methods"].get(m)
            if a and b and a["seconds"] > 0:
                mem = (b["peak_rss_mb_max"] / a["peak_rss_mb_max"]
                       if a["peak_rss_mb_max"] and b["peak_rss_mb_max"] is not None else None)
                scaling[str(n)][m] = {"time": b["seconds"] / a["seconds"], "peak_rss": mem}
    return {"estimate": est, "scaling_vs_n": {"reference_n": int(n0), "by_n": scaling}}


# --- whole part ----------------------------------------------------------------------------------------------


def run_whole(family: str, args) -> list[dict]:
    ms = _load("merge_speed")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base = ms.build_base(cache, args.size, family=family)
    features = dict(args.features)
    out = []
    with tempfile.TemporaryDirectory(prefix="speed-", dir=cache) as work:
        for n in args.ns_whole:
            concepts = ms.build_loras(cache, base, n, args.rank, 0.1)
            counts = ms.module_counts(concepts[0]["lora"])
            for label in args.methods:
                print(f"{family} N={n}: merging with {label} ...", flush=True)
                r = ms.run_method(label, base, concepts, features, args.threads, Path(work))
                r.update(family=family, N=n, lora_modules=counts)
                out.append(r)
                print("\n".join(ms.table([r])[2:]), flush=True)
    return out


def whole_ratios(results: list[dict], baseline: str) -> list[dict]:
    """Per family and N: each method's phase and total times as baseline / method; per family and method:
    total time and peak RSS at each N over the smallest N's."""
    ok = [r for r in results if "error" not in r]
    rows = []
    for r in ok:
        base = next((b for b in ok if b["family"] == r["family"] and b["N"] == r["N"] and b["label"] == baseline),
                    None)
        n0 = min(b["N"] for b in ok if b["family"] == r["family"] and b["label"] == r["label"])
        ref = next(b for b in ok if b["family"] == r["family"] and b["label"] == r["label"] and b["N"] == n0)
        total = sum(r["timings_s"].values())
        rows.append({
            "family": r["family"], "N": r["N"], "method": r["label"], "total_s": total,
            "baseline_over_method": (sum(base["timings_s"].values()) / total) if base and total else None,
            "time_vs_smallest_n": total / sum(ref["timings_s"].values()),
            "peak_rss_vs_smallest_n": r["peak_rss_gb"] / ref["peak_rss_gb"], "reference_n": n0,
        })
    return rows


# --- driver --------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return sorted({int(x) for x in s.split(",") if x.strip()})


def _names(s: str, known, what: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {sorted(known)}")
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _git() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE, check=False).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_in_merge_code": git("status", "--porcelain", "--", str(HERE.parent / "src/loraclr/merge"))}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="solve,whole", help="solve, whole, or both (comma-separated)")
    ap.add_argument("--families", default="sd1,sdxl", help="model families (real configs, random weights)")
    ap.add_argument("--size", default="real", choices=["real", "tiny"], help="the families' real or tiny configs")
    ap.add_argument("--n", default=None, help="concept counts of both parts (default 2,6,12; --quick: 2,3)")
    ap.add_argument("--n-solve-extra", default=None, help="more concept counts, solve part only (default 50)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--deltas", default="factors", choices=["factors", "dense"],
                    help="solve part: deltas as LoRA factors (what loraclr merge passes; the converged solve's "
                    "factored closed form applies) or dense (out, in) tensors")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (solve part: this process)")
    # solve part
    ap.add_argument("--solve-methods", default=",".join(SOLVE_METHODS))
    ap.add_argument("--rows", default=None,
                    help="rows per concept per layer (default: the merge's cap, FeatureSettings.max_rows), or "
                         "'official': the official feature collection's per layer (see --timesteps)")
    ap.add_argument("--timesteps", type=int, default=2,
                    help=f"--rows official: sampling steps of the spatial layers' rows (official: "
                         f"{OFFICIAL_TIMESTEPS}; fewer keep paper's 50 AdamW steps affordable)")
    ap.add_argument("--paper-steps", type=int, default=3, help=f"AdamW steps run (time = {PAPER_STEPS} x median)")
    ap.add_argument("--lbfgs-steps", type=int, default=5, help=f"L-BFGS iterations run (time scaled to {LBFGS_STEPS})")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each closed-form solve (median)")
    ap.add_argument("--shapes", default="", help="only layer shapes whose first key contains one of these "
                    "comma-separated substrings (the whole-model estimate then covers only them)")
    ap.add_argument("--max-cell-s", type=float, default=0.0,
                    help="skip a cell whose wall time, predicted from smaller N, exceeds this (0: run all)")
    # whole part
    ap.add_argument("--whole-families", default=None, help="whole part: families (default: --families)")
    ap.add_argument("--methods", default="sum", help="whole part: bench/merge_speed.py method labels")
    ap.add_argument("--baseline", default="paper", help="whole part: method the others are compared with")
    ap.add_argument("--steps", type=int, default=None, help="whole part: features.steps override")
    ap.add_argument("--precision", default=None, help="whole part: features.precision override")
    ap.add_argument("--cache", default=os.environ.get("LORACLR_BENCH_CACHE", str(Path(tempfile.gettempdir())
                                                                              / "loraclr-bench-cache")))
    ap.add_argument("--quick", action="store_true",
                    help="tiny configs, N 2,3, 32 rows, 2 paper steps, 5 L-BFGS iterations, sum (seconds)")
    ap.add_argument("--out", default=str(HERE / "results" / "speed"), help="results prefix (.json / .md)")
    ap.add_argument("--notes", default="", help="free text for the top of the .md (what was and was not run)")
    ap.add_argument("--render-from", help="write the .md of a saved .json again (e.g. with --notes), run nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    global SS
    ap = build_parser()
    args = ap.parse_args(argv)
    SS = _load("solve_speed")
    ms = _load("merge_speed")
    if args.render_from:
        res = json.loads(Path(args.render_from).read_text())
        md = render(res, args.notes, ms)
        Path(args.out).with_suffix(".md").write_text(md)
        print(md)
        return 0
    parts = _names(args.part, {"solve", "whole"}, "part")
    args.families_list = _names(args.families, {"sd1", "sdxl"}, "family")
    args.whole_families = _names(args.whole_families or args.families, {"sd1", "sdxl"}, "family")
    args.solve_methods = _names(args.solve_methods, SOLVERS, "solve method")
    args.methods = _names(args.methods, ms.METHODS, "whole-merge method")
    args.features = {}
    if args.quick:
        args.size, args.rows, args.paper_steps, args.lbfgs_steps = "tiny", args.rows or "32", 2, 5
        args.n, args.n_solve_extra = args.n or "2,3", args.n_solve_extra or ""
        args.features = {"resolution": 128, "steps": 2}
    for name in ("steps", "precision"):
        if getattr(args, name) is not None:
            args.features[name] = getattr(args, name)
    if args.rows not in (None, "official"):
        try:
            args.rows = int(args.rows)
        except ValueError:
            ap.error(f"--rows: an integer or 'official', not {args.rows!r}")
    args.rows = args.rows or FeatureSettings().max_rows
    args.n, args.n_solve_extra = args.n or "2,6,12", "50" if args.n_solve_extra is None else args.n_solve_extra
    args.ns_whole = _ints(args.n)
    args.ns = _ints(args.n + "," + args.n_solve_extra)
    torch.set_num_threads(args.threads)
    meta = {
        "command": "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc_start": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "uptime_start": _uptime(), "nproc": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(), "git": _git(), "size": args.size,
        "rank": args.rank, "deltas": args.deltas, "rows_per_concept": args.rows,
        "official_timesteps": args.timesteps if args.rows == "official" else None, "paper_steps_run": args.paper_steps,
        "paper_steps_official": PAPER_STEPS, "lbfgs_steps_run": args.lbfgs_steps, "lbfgs_steps_official": LBFGS_STEPS,
        "repeat": args.repeat, "max_cell_s": args.max_cell_s, "n_solve": args.ns, "n_whole": args.ns_whole,
        "whole_features_overrides": args.features, "whole_baseline": args.baseline,
    }
    res: dict = {"meta": meta, "solve": {}, "whole": []}
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else None
    partial = out.with_name(out.name + ".partial.json") if out else None
    if "solve" in parts:
        for fam in args.families_list:
            res["solve"][fam] = run_solve(fam, args)
            if partial:  # a long run stopped later keeps the families it finished
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(res, indent=1))
    if "whole" in parts:
        for fam in args.whole_families:
            res["whole"] += run_whole(fam, args)
        res["whole_ratios"] = whole_ratios(res["whole"], args.baseline)
    meta.update(uptime_end=_uptime(), date_utc_end=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                wall_s=time.perf_counter() - t0)
    if out:  # the numbers first: a report bug must not lose a long run
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        if partial and partial.exists():
            partial.unlink()
    md = render(res, args.notes, ms)
    print(md)
    if out:
        out.with_suffix(".md").write_text(md)
    return 1 if any("error" in r for r in res["whole"]) else 0


# --- report --------------------------------------------------------------------------------------------------


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render(res: dict, notes: str, ms) -> str:
    m = res["meta"]
    md = ["# Merge speed and memory: per method, per phase, scaling with N (issue 5)", ""]
    if notes:
        md += [notes, ""]
    stopped = "wall_s" not in m  # a run stopped early: rendered from its partial JSON (finished families only)
    span = "stopped before the end" if stopped else f"{m.get('date_utc_end')} UTC, {m['wall_s']:.0f} s"
    md += [f"Command: `{m['command']}` ({m['date_utc_start']} - {span}); "
           f"torch {m['torch']}, {m['threads']} torch thread(s), {m['nproc']} cores shared with other jobs; "
           f"`uptime` at the start: `{m['uptime_start']}`, at the end: `{m.get('uptime_end', '-')}`. Code at "
           f"{m['git']['commit']}" + (f" with uncommitted solver changes (`{m['git']['uncommitted_in_merge_code']}`)"
                                      if m["git"]["uncommitted_in_merge_code"] else "") + ".", ""]
    for fam, part in res["solve"].items():
        md += solve_section(fam, part, m)
    if res["whole"]:
        md += ["## Whole merges (`loraclr merge`, each in its own process)", "",
               f"Feature overrides: {m['whole_features_overrides'] or 'none'}; rank {m['rank']}. "
               "Phase times from the merge's own summary; peak RSS = ru_maxrss of the merge process.", ""]
        for fam in dict.fromkeys(r["family"] for r in res["whole"]):
            for n in dict.fromkeys(r["N"] for r in res["whole"] if r["family"] == fam):
                rs = [r for r in res["whole"] if r["family"] == fam and r["N"] == n]
                c = next((r["lora_modules"] for r in rs if "lora_modules" in r), {})
                md += [f"**{fam}, N = {n}** ({c.get('unet')} UNet + {c.get('text_encoder')} text-encoder modules)",
                       "", *ms.table(rs), ""]
        md += ["Ratios (total merge time; baseline = " + f"`{m['whole_baseline']}`):", "",
               "| family | N | method | total s | baseline / method | time vs N=ref | peak RSS vs N=ref |",
               "|---|---|---|---|---|---|---|"]
        for r in res["whole_ratios"]:
            md.append(f"| {r['family']} | {r['N']} | {r['method']} | {r['total_s']:.1f} | "
                      f"{_s(r['baseline_over_method'])} | {r['time_vs_smallest_n']:.2f} (ref N={r['reference_n']}) | "
                      f"{r['peak_rss_vs_smallest_n']:.2f} |")
        md.append("")
    return "\n".join(md) + "\n"


def solve_section(fam: str, part: dict, m: dict) -> list[str]:
    shapes, est = part["shapes"], part["summary"]["estimate"]
    methods = list(dict.fromkeys(c["method"] for c in part["cells"]))
    n_mod = sum(s["count"] for s in shapes)
    md = [f"## Solve phase, {fam} ({m['size']} config): {len(shapes)} layer shapes standing for {n_mod} modules", "",
          f"Random W0, rows (uneven channel scales, per-concept shifts) and rank-{m['rank']} deltas at each shape "
          + ("(passed as LoRA factors, as `loraclr merge` does); " if m.get("deltas") == "factors"
             else "(passed as dense tensors); ")
          + (f"**the official feature collection's rows per concept** (text encoder {OFFICIAL_TE_ROWS}, cross-attention "
             f"k/v {OFFICIAL_KV_ROWS}, other UNet layers their latent positions at the native resolution x "
             f"{m['official_timesteps']} of the official {OFFICIAL_TIMESTEPS} sampling steps; paper's time grows "
             f"linearly with the rows, the closed-form solves' only partly, so at fewer steps the paper / converged "
             f"ratios are lower bounds of the official ones). "
             if m.get("official_timesteps") else
             f"**{m['rows_per_concept']} rows per concept per layer** (the merge keeps up to 2048 by default). ") +
          f"Whole-model seconds = sum over shapes of (one layer's seconds x layers of that shape): an "
          f"extrapolation from one layer per shape. paper = {m['paper_steps_official']} x its median AdamW "
          f"step ({m['paper_steps_run']} run; setup excluded); lbfgs = setup + time per loss evaluation x the "
          f"evaluations of a {m['lbfgs_steps_official']}-iteration run, min({m['lbfgs_steps_official'] * 5 // 4} "
          f"(torch's max_eval), {m['lbfgs_steps_official']} x evaluations per iteration of the "
          f"{m['lbfgs_steps_run']} run); sum / lstsq / converged run to the end (median of {m['repeat']}). Peak = the largest per-layer solve peak RSS above the RSS before it "
          "(lbfgs: plus the (s, y) history pairs its short run did not store yet, 2 x 25 x the weight's size in "
          "a full run).",
          ""]
    left = part.get("shapes_not_finished", []) + part.get("shapes_not_started", [])
    if left:  # a stopped run: the estimate covers only the shapes above
        md += [f"**Not a whole-model estimate**: only the {len(shapes)} shapes finished ({n_mod} modules); not "
               f"finished: {', '.join(f'`{k}`' for k in left)}.", ""]
    head = ["N", *[f"{x} s" for x in methods], *[f"{b}/{f}" for b in BASELINES for f in FAST
                                                   if b in methods and f in methods],
            *[f"{x} peak MB" for x in methods]]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged = False
    for n, e in est.items():
        cells = []
        for x in methods:
            r = e["methods"].get(x)
            mark = ("*" if r and r["extrapolated_from_steps"] else "") + ("†" if r and r["predicted_not_run"] else "")
            flagged |= bool(mark)
            cells.append("-" if r is None else f"{r['seconds']:.1f}{mark}")
        cells += [f"{e['ratios'][f'{b}/{f}']:.1f}" if f"{b}/{f}" in e["ratios"] else "-"
                  for b in BASELINES for f in FAST if b in methods and f in methods]
        cells += [_s((e["methods"].get(x) or {}).get("peak_rss_mb_max")) for x in methods]
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    md += ["", "\\* time = official steps x measured time per step (fewer steps run). † some layer shapes not run at "
           "this N (their wall time, predicted from smaller N, exceeded --max-cell-s): their time is that "
           "prediction." if flagged else "", ""]
    sc = part["summary"]["scaling_vs_n"]
    md += [f"Scaling with N (whole-model solve time and largest per-layer peak RSS, over N = {sc['reference_n']}):",
           "", "| N | " + " | ".join(f"{x} time / mem" for x in methods) + " |", "|---|" + "---|" * len(methods)]
    for n, row in sc["by_n"].items():
        md.append(f"| {n} | " + " | ".join(
            f"{row[x]['time']:.2f} / {_s(row[x]['peak_rss'])}" if x in row else "-" for x in methods) + " |")
    md += ["", "<details><summary>Per layer shape (seconds for one layer; fit = least-squares MSE of the result)"
           "</summary>", "", "| layer (out x in, count) | N | " + " | ".join(f"{x} s / MB / fit" for x in methods)
           + " |", "|---|---|" + "---|" * len(methods)]
    by = {(c["shape"], c["N"], c["method"]): c for c in part["cells"]}
    for s in shapes:
        for n in est:
            cs = [by.get((s["key"], int(n), x)) for x in methods]
            rows = f", {s['rows']} rows" if "rows" in s else ""
            md.append(f"| {s['key']} ({s['out']}x{s['in']}, x{s['count']}{rows}) | {n} | " + " | ".join(
                "-" if c is None else f"{c['seconds']:.3g}{'*' if c['extrapolated'] and c['measured_s'] else ''}"
                f"{'†' if c['measured_s'] is None else ''} / {_s(c['peak_rss_mb'])} / {_s(c.get('lsq_mse'))}"
                for c in cs) + " |")
    md += ["", "</details>", ""]
    return md


if __name__ == "__main__":
    sys.exit(main())
