"""Scale (issue 26): whole merges in one process and on a local Ray cluster, per phase and per process memory,
then a projection of larger libraries on more workers from the task costs measured here.

Parts (each optional):

``whole``    one ``loraclr merge`` per (N, executor), each in its own process: the family's real config with
             random weights and N random rank-16 kohya LoRAs on every default kohya module (the inputs of
             ``bench/merge_speed.py``). Executors: ``local`` (in-process, the default merge) and ``ray:W`` (a
             local Ray cluster of W one-thread workers started by the merge). Recorded: phase times, each
             stage's feature and solve seconds, every layer's solve seconds, the driver's peak RSS and each Ray
             worker's.
``solve``    the solve alone, one layer of each distinct weight shape of the family at several N, with the
             merge's own row cap (``features.max_rows``) per concept (``bench/speed.py``'s solve part, the
             default method): how a layer's solve time and memory grow with N where whole merges at that N do
             not fit this machine.
``project``  from the costs above: makespan and memory for N in ``--project-n`` on ``--project-workers``
             workers. The model (:func:`makespan`): start + per stage [ceil(N / W) x one concept's feature
             run + the stage's layer solves scheduled longest-first on W workers (each layer's time at N from
             a power law fitted to its shape's measured times) + a per-task overhead] + export. Each whole
             run on Ray is also predicted from the local run's costs at the same N, and the error is reported:
             that is the check of the model.

    python bench/scale.py --quick                                   # tiny config, seconds
    python bench/scale.py --family sd1 --n 2,6,12 --executors local,ray:2
    python bench/scale.py --family sdxl --part solve --n 2,6,12     # SDXL layer costs (minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- the model -----------------------------------------------------------------------------------------------


def power_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(c, e) of t = c * N^e through measured (N, t) points, least squares in log-log; one point: e = 1."""
    pts = [(n, t) for n, t in points if n > 0 and t > 0]
    if not pts:
        return 0.0, 1.0
    if len({n for n, _ in pts}) < 2:
        n, t = pts[-1]
        return t / n, 1.0
    xs, ys = [math.log(n) for n, _ in pts], [math.log(t) for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    e = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - e * mx), e


def longest_first(times: list[float], workers: int) -> float:
    """Makespan of independent tasks on ``workers`` identical workers, each task to the least-loaded worker,
    longest first (LPT: within 4/3 of the optimum)."""
    loads = [0.0] * max(1, workers)
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads)


@dataclasses.dataclass
class StageCosts:
    """One stage's task costs: one concept's feature run (seconds), and per layer the (c, e) of its solve time
    c * N^e; ``overhead_s`` per task (scheduling and moving features), from Ray runs."""

    feature_s: float
    layers: list[tuple[float, float]]


def makespan(stages: dict[str, StageCosts], n: int, workers: int, *, start_s: float, export_s: float,
             overhead_s: float = 0.0) -> dict:
    """Predicted seconds of a merge of ``n`` concepts on ``workers`` workers (the module docstring's model),
    with each phase's share."""
    out = {"start": start_s, "features": 0.0, "solve": 0.0, "export": export_s}
    for s in stages.values():
        out["features"] += math.ceil(n / workers) * (s.feature_s + overhead_s)
        out["solve"] += longest_first([c * n**e + overhead_s for c, e in s.layers], workers)
    out["total"] = sum(out.values())
    return out


# --- whole merges ------------------------------------------------------------------------------------------


def worker(spec_path: str) -> None:
    """One merge in this process (``--worker``): writes timings, memory and the report's costs."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from loraclr.merging import merge

    recipe = _load("merge_speed").spec_recipe(spec)
    t = time.perf_counter()
    s = merge(recipe, spec["out_dir"], progress=True, overwrite=True)
    wall = time.perf_counter() - t
    report = json.loads((Path(spec["out_dir"]) / "report.json").read_text())
    Path(spec["result"]).write_text(json.dumps({
        "timings_s": s.timings,
        "merge_wall_s": wall,
        "driver_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "workers": report.get("executor", {}).get("workers", []),
        "stages": report.get("stages", {}),
        "layers": {k: {"stage": r.get("stage"), "time_s": r.get("time_s")} for k, r in report["layers"].items()},
    }))


def parse_executor(text: str) -> dict:
    """``local`` or ``ray:W`` -> ExecutorSettings fields."""
    if text == "local":
        return {"kind": "local"}
    kind, _, w = text.partition(":")
    if kind != "ray" or not w.isdigit() or int(w) < 1:
        raise ValueError(f"executor {text!r}: expected 'local' or 'ray:W' (W workers)")
    return {"kind": "ray", "address": "local", "workers": int(w), "cpus_per_worker": 1}


def run_whole(args, ms) -> list[dict]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base = ms.build_base(cache, args.size, family=args.family)
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=cache) as work:
        work = Path(work)
        for n in args.ns:
            concepts = ms.build_loras(cache, base, n, args.rank, 0.1)
            for ex in args.executors:
                label = f"N{n}-{ex.replace(':', '')}"
                spec = {"base": str(base), "concepts": concepts, "method": "loraclr", "features": args.features,
                        "executor": parse_executor(ex), "threads": args.threads,
                        "out_dir": str(work / f"out-{label}"), "result": str(work / f"result-{label}.json")}
                (work / f"spec-{label}.json").write_text(json.dumps(spec))
                print(f"{args.family} N={n} on {ex} ...", flush=True)
                t = time.perf_counter()
                with open(work / f"log-{label}.txt", "w") as log:
                    proc = subprocess.run([sys.executable, __file__, "--worker", str(work / f"spec-{label}.json")],
                                          stdout=log, stderr=log)
                r = {"family": args.family, "N": n, "executor": ex, "process_wall_s": time.perf_counter() - t}
                shutil.rmtree(spec["out_dir"], ignore_errors=True)
                if proc.returncode != 0:
                    r["error"] = (work / f"log-{label}.txt").read_text()[-2000:]
                else:
                    r.update(json.loads(Path(spec["result"]).read_text()))
                results.append(r)
                print(whole_row(r), flush=True)
    return results


# --- costs and projections ---------------------------------------------------------------------------------


def stage_costs(run: dict, fits: dict[str, tuple[float, float]] | None = None) -> dict[str, StageCosts]:
    """Task costs of one whole run (local executor): per stage one concept's feature seconds (the stage's
    feature time / N) and each layer's solve time as (c, e): ``fits`` by layer type where given, else the
    layer's own time with e = 1 anchored at this N. A layer's time is its solve's share of the stage's solve
    phase, which also builds each problem and its fidelity report (work a Ray solve task does too)."""
    ms = _load("merge_speed")
    n = run["N"]
    out = {}
    for name, st in run["stages"].items():
        own = {k: r["time_s"] for k, r in run["layers"].items() if r["stage"] == name and r["time_s"] is not None}
        share = st["solve_s"] / sum(own.values()) if sum(own.values()) > 0 else 1.0
        layers = []
        for key, t in own.items():
            fit = (fits or {}).get(ms.layer_type(key))
            e = fit[1] if fit else 1.0
            layers.append((t * share / n**e, e))
        out[name] = StageCosts(feature_s=st["features_s"] / n, layers=layers)
    return out


def type_exponents(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """Per layer type, (c, e) of its summed solve time over N, from local runs at several N."""
    ms = _load("merge_speed")
    pts: dict[str, list] = {}
    for r in runs:
        per: dict[str, float] = {}
        for key, rep in r["layers"].items():
            if rep["time_s"] is not None:
                per[ms.layer_type(key)] = per.get(ms.layer_type(key), 0.0) + rep["time_s"]
        for t, s in per.items():
            pts.setdefault(t, []).append((r["N"], s))
    return {t: power_fit(p) for t, p in pts.items()}


def check_model(runs: list[dict]) -> list[dict]:
    """Each Ray run predicted from the local run at the same N (its per-task costs, no overhead) and with the
    per-task overhead fitted over all Ray runs; relative errors."""
    ok = [r for r in runs if "error" not in r and r.get("stages")]
    local = {r["N"]: r for r in ok if r["executor"] == "local"}
    ray_runs = [r for r in ok if r["executor"] != "local" and r["N"] in local]
    rows = []
    for r in ray_runs:
        ref = local[r["N"]]
        w = int(r["executor"].split(":")[1])
        costs = stage_costs(ref)
        t = r["timings_s"]
        start = t.get("load", 0.0) + t.get("workers", 0.0)
        pred = makespan(costs, r["N"], w, start_s=start, export_s=t.get("export", 0.0))
        measured = t.get("features", 0.0) + t.get("solve", 0.0)
        tasks = sum(math.ceil(r["N"] / w) + len(c.layers) for c in costs.values())
        rows.append({"N": r["N"], "workers": w, "measured_work_s": measured,
                     "predicted_work_s": pred["features"] + pred["solve"], "tasks_on_critical_path": tasks,
                     "local_work_s": ref["timings_s"]["features"] + ref["timings_s"]["solve"]})
    for row in rows:
        row["overhead_per_task_s"] = max(0.0, (row["measured_work_s"] - row["predicted_work_s"])
                                         / row["tasks_on_critical_path"])
        row["error_without_overhead"] = row["predicted_work_s"] / row["measured_work_s"] - 1
    return rows


def project(runs: list[dict], solve_cells: list[dict] | None, ns: list[int], workers: list[int],
            overhead_s: float, exponent_runs: list[dict] | None = None) -> list[dict]:
    """Makespan and memory for each (N, W) from the largest local run's costs: feature runs as measured,
    solves scaled by N with exponents per layer type from the solve part (per shape) where given, else from
    the local runs at several N, else from ``exponent_runs`` (another family's local runs)."""
    ok = [r for r in runs if "error" not in r and r.get("stages") and r["executor"] == "local"]
    if not ok:
        return []
    ref = max(ok, key=lambda r: r["N"])
    fits = type_exponents([r for r in exponent_runs or [] if "error" not in r and r["executor"] == "local"])
    if len({r["N"] for r in ok}) > 1:
        fits.update(type_exponents(ok))
    if solve_cells:
        ms = _load("merge_speed")
        pts: dict[str, list] = {}
        for c in solve_cells:
            pts.setdefault(ms.layer_type(c["shape"]), []).append((c["N"], c["seconds"]))
        fits.update({t: power_fit(p) for t, p in pts.items()})
    costs = stage_costs(ref, fits)
    peaks: dict[str, list] = {}  # one layer's solve memory against N, per shape (solve part)
    for c in solve_cells or []:
        if c.get("peak_rss_mb"):
            peaks.setdefault(c["shape"], []).append((c["N"], c["peak_rss_mb"]))
    peak_fits = [power_fit(p) for p in peaks.values()]
    t = ref["timings_s"]
    worker_rss = max([w["peak_rss_mb"] for r in runs if "error" not in r for w in r.get("workers", [])
                      if w.get("worker") != "driver"] or [0.0]) / 1024
    out = []
    for n in ns:
        for w in workers:
            p = makespan(costs, n, w, start_s=t.get("load", 0.0), export_s=t.get("export", 0.0),
                         overhead_s=overhead_s)
            out.append({"N": n, "workers": w, **{k: round(v, 1) for k, v in p.items()},
                        "worker_peak_gb_measured": round(worker_rss, 2) if worker_rss else None,
                        "solve_task_gb": round(max(c * n**e for c, e in peak_fits) / 1024, 2) if peak_fits else None,
                        "from": f"local N={ref['N']}"})
    return out


# --- report --------------------------------------------------------------------------------------------------


def whole_row(r: dict) -> str:
    if "error" in r:
        last = (r["error"].strip().splitlines() or ["no output"])[-1]
        return f"| {r['N']} | {r['executor']} | failed: {last[:160]} | | | | | | |"
    t = r["timings_s"]
    workers = [w for w in r.get("workers", []) if w.get("worker") != "driver"]
    wmax = max((w["peak_rss_mb"] for w in workers), default=None)
    return (f"| {r['N']} | {r['executor']} | {t.get('load', 0) + t.get('workers', 0):.1f} | "
            f"{t.get('features', 0):.1f} | {t.get('solve', 0):.1f} | {t.get('export', 0):.1f} | "
            f"{sum(t.values()):.1f} | {r['driver_peak_rss_gb']:.2f} | "
            f"{'-' if wmax is None else f'{wmax / 1024:.2f} x {len(workers)}'} |")


def render(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Scale: whole merges locally and on a local Ray cluster, and projections ({m['family']})", "",
             res.get("notes", ""), "",
             f"Command: `{m['command']}` ({m['date_utc']} UTC, {m['wall_s']:.0f} s); torch {m['torch']}, "
             f"{m['nproc']} cores, {m['threads']} torch thread(s) per process; load average at the start "
             f"{m['load_start']}, at the end {m['load_end']}. Model: {m['model']}. Code at {m['commit']}.", ""]
    if res.get("whole"):
        lines += ["## Whole merges (each in its own process)", "",
                  "start = loading the base and LoRAs (+ starting the Ray workers); peak RSS: the merge's "
                  "process (driver) and each Ray worker process.", "",
                  "| N | executor | start s | features s | solve s | export s | total s | driver peak GB | "
                  "worker peak GB |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [whole_row(r) for r in res["whole"]]
        speed = []
        for r in res["whole"]:
            ref = next((b for b in res["whole"] if b["N"] == r["N"] and b["executor"] == "local"
                        and "error" not in b), None)
            if ref and "error" not in r and r["executor"] != "local":
                speed.append(f"| {r['N']} | {r['executor']} | "
                             f"{sum(r['timings_s'].values()) / sum(ref['timings_s'].values()):.2f} |")
        if speed:
            lines += ["", "Time against the local merge at the same N (goal for 2 workers: at most 0.6):", "",
                      "| N | executor | total / local total |", "|---|---|---|", *speed]
    if res.get("check"):
        lines += ["", "## The model checked against the Ray runs", "",
                  "Features + solve of each Ray run, predicted from the local run's task costs at the same N "
                  "(one concept's feature run per stage, each layer's solve) with longest-first scheduling "
                  "and no overhead; the difference is the Ray overhead per task on the critical path.", "",
                  "| N | workers | local s | predicted s | measured s | error | overhead per task s |",
                  "|---|---|---|---|---|---|---|"]
        for c in res["check"]:
            lines.append(f"| {c['N']} | {c['workers']} | {c['local_work_s']:.1f} | {c['predicted_work_s']:.1f} | "
                         f"{c['measured_work_s']:.1f} | {c['error_without_overhead']:+.0%} | "
                         f"{c['overhead_per_task_s']:.3f} |")
    if res.get("solve_cells"):
        lines += ["", "## One layer's solve against N (default method, rows capped as in the merge)", "",
                  "| layer (shape) | N | seconds | peak MB |", "|---|---|---|---|"]
        for c in res["solve_cells"]:
            peak = "-" if c.get("peak_rss_mb") is None else f"{c['peak_rss_mb']:.0f}"
            lines.append(f"| {c['shape']} | {c['N']} | {c['seconds']:.3g} | {peak} |")
    if res.get("projection"):
        lines += ["", "## Projection", "", res["projection_note"], "",
                  "| N | workers | start s | features s | solve s | export s | total min | worker peak GB "
                  "(measured) | largest layer solve GB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in res["projection"]:
            lines.append(f"| {p['N']} | {p['workers']} | {p['start']:.0f} | {p['features']:.0f} | "
                         f"{p['solve']:.0f} | {p['export']:.0f} | {p['total'] / 60:.1f} | "
                         f"{p['worker_peak_gb_measured'] or '-'} | {p['solve_task_gb'] or '-'} |")
    return "\n".join(lines) + "\n"


def _ints(s: str) -> list[int]:
    return sorted({int(x) for x in s.split(",") if x.strip()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    ap.add_argument("--size", default="real", choices=["real", "tiny"])
    ap.add_argument("--part", default="whole,project", help="whole, solve, project (comma-separated)")
    ap.add_argument("--n", default=None, help="concept counts of the whole and solve parts (default 2,6,12; "
                    "--quick: 2,3)")
    ap.add_argument("--executors", default="local,ray:2", help="local and/or ray:W, comma-separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local merge process")
    ap.add_argument("--steps", type=int, default=None, help="features.steps override")
    ap.add_argument("--resolution", type=int, default=None, help="features.resolution override")
    ap.add_argument("--project-n", default="12,50,100")
    ap.add_argument("--project-workers", default="1,2,8,32")
    ap.add_argument("--from", dest="from_json", help="start from the whole / solve parts of this results .json "
                    "(new whole runs are added to its runs)")
    ap.add_argument("--exponents-from", help="a results .json whose local runs at several N give the solve "
                    "times' growth with N (e.g. the SD 1.5 file for an SDXL run at one N)")
    ap.add_argument("--overhead-from", help="a results .json whose Ray runs give the per-task overhead")
    ap.add_argument("--quick", action="store_true", help="tiny config, N = 2,3, 64 px, 2 steps")
    ap.add_argument("--cache", default=os.environ.get("LORACLR_BENCH_CACHE", str(Path(tempfile.gettempdir())
                                                                              / "loraclr-bench-cache")))
    ap.add_argument("--out", default=str(HERE / "results" / "scale"), help="results prefix (.json / .md)")
    ap.add_argument("--notes", default="")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    if args.quick:
        args.size, args.n = "tiny", args.n or "2,3"
        args.steps, args.resolution = args.steps or 2, args.resolution or 64
    args.ns = _ints(args.n or "2,6,12")
    args.executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    for e in args.executors:
        parse_executor(e)
    args.features = {k: v for k, v in (("steps", args.steps), ("resolution", args.resolution)) if v is not None}
    parts = {p.strip() for p in args.part.split(",")}
    ms = _load("merge_speed")
    t0, load_start = time.time(), os.getloadavg()
    res: dict = {"notes": args.notes}
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        res.update({k: old[k] for k in ("whole", "solve_cells") if old.get(k)})
    if "whole" in parts:  # added to the runs of --from, replacing its failed runs and those run again
        again = {(n, e) for n in args.ns for e in args.executors}
        kept = [r for r in res.get("whole", []) if "error" not in r and (r["N"], r["executor"]) not in again]
        res["whole"] = kept + run_whole(args, ms)
    if "solve" in parts:
        from loraclr.recipe import FeatureSettings

        sp = _load("speed")
        sargs = argparse.Namespace(size=args.size, timesteps=None, rows=FeatureSettings().max_rows, shapes="",
                                   ns=args.ns, rank=args.rank, deltas="factors", solve_methods=["default"],
                                   max_cell_s=0.0, repeat=1, paper_steps=1, lbfgs_steps=1)
        torch.set_num_threads(args.threads)
        res["solve_cells"] = [{k: c[k] for k in ("shape", "N", "seconds", "peak_rss_mb")}
                              for c in sp.run_solve(args.family, sargs)["cells"]]
    if res.get("whole"):
        res["check"] = check_model(res["whole"])
    if "project" in parts and res.get("whole"):
        checks = res.get("check", []) + (json.loads(Path(args.overhead_from).read_text()).get("check", [])
                                         if args.overhead_from else [])
        # the Ray run at the largest N: the closest to the projected sizes
        overhead = max(checks, key=lambda c: (c["N"], c["workers"]))["overhead_per_task_s"] if checks else 0.0
        other = json.loads(Path(args.exponents_from).read_text())["whole"] if args.exponents_from else None
        res["projection"] = project(res["whole"], res.get("solve_cells"), _ints(args.project_n),
                                    _ints(args.project_workers), overhead, other)
        res["projection_note"] = (
            "Task costs from the largest local run of this file (one concept's feature run per stage, each "
            "layer's solve), solves scaled to N by a power law per layer type fitted to the measured N"
            f"{' (solve part)' if res.get('solve_cells') else ' (whole runs)'}"
            f"{f', exponents from the local runs of {args.exponents_from}' if args.exponents_from else ''}"
            "; per-task overhead "
            f"{overhead:.3f} s (from the Ray run at the largest N); CPU workers with the measured run's threads "
            f"({args.threads} per process here), each holding one copy of the model. "
            "Not modelled: moving features between machines, object-store capacity, GPU workers (no GPU was "
            "measured).")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    res["meta"] = {
        "command": "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "family": args.family, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
        "wall_s": time.time() - t0, "torch": torch.__version__, "python": platform.python_version(),
        "nproc": os.cpu_count(), "threads": args.threads, "commit": commit.stdout.strip() or "unknown",
        "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
        "model": f"{args.family} {args.size} config, random weights; rank-{args.rank} kohya LoRAs on every "
                 f"default module; feature overrides {args.features or 'none'}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(render(res))
    print(render(res))
    return 1 if any("error" in r for r in res.get("whole", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
