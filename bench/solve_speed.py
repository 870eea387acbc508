"""Solve speed of the per-layer merge: LoRACLR ``paper`` (the official way) vs ``converged`` vs ``lstsq``.

Random SD-1.5-shaped layer problems (weights, features and rank-16 LoRA deltas are random; shapes are
real): 12 concepts, and rows per concept as the official feature collection gives them
(text encoder: (7 + 4) tokens x 16 layer-wise prompts = 176; cross-attention k/v: 3 positions x 2 prompts = 6;
spatial layers: positions x 20 sampling steps at 512 px), with the spatial rows scaled by
``--timesteps / 20`` so that the official 50-step AdamW solve fits 2 CPU cores in a few minutes.
All solvers see the same features (raw rows X); ``converged`` and ``lstsq`` include forming the Grams.

    python bench/solve_speed.py                       # writes bench/results/solve_speed.{json,md}
    python bench/solve_speed.py --timesteps 1 --variants
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from loraclr.merge.api import LayerProblem, LowRankDeltas
from loraclr.merge.methods import merge_offsets

# name, in, out, rows per concept at the official settings (20 timesteps for spatial layers)
LAYERS = [
    ("te q_proj (768)", 768, 768, 176, False),
    ("unet attn2.to_k (768->320)", 768, 320, 6, False),
    ("unet attn1.to_q 64x64 (320)", 320, 320, 20 * 64 * 64, True),
    ("unet attn1.to_q 32x32 (640)", 640, 640, 20 * 32 * 32, True),
    ("unet attn1.to_q 16x16 (1280)", 1280, 1280, 20 * 16 * 16, True),
    ("unet ff.net.2 16x16 (5120->1280)", 5120, 1280, 20 * 16 * 16, True),
]


def make_problem(name, d_in, d_out, n_rows, n_concepts, rank, seed, factors=False):
    """A random layer problem; ``factors``: the same deltas as LoRA factors (LowRankDeltas), as the merge
    passes them, instead of dense (out, in) tensors."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    channel_scale = torch.exp(0.5 * torch.randn(d_in, generator=g))  # activations: uneven channel scales
    deltas, xs, ups, downs = [], [], [], []
    for _ in range(n_concepts):
        A = torch.randn(rank, d_in, generator=g) / d_in**0.5
        B = torch.randn(d_out, rank, generator=g) * (0.3 / rank**0.5)
        deltas.append(B @ A)  # ||dW|| ~ 0.3 ||W0||-ish per direction it touches
        ups.append(B)
        downs.append(A)
        shift = 0.3 * torch.randn(d_in, generator=g)  # concept-specific input statistics
        xs.append((torch.randn(n_rows, d_in, generator=g) + shift) * channel_scale)
    if factors:
        deltas = LowRankDeltas(ups, downs, [1.0] * n_concepts)
    return LayerProblem(f"bench.{name}", W0, deltas, X=xs, concept_names=[f"c{i}" for i in range(n_concepts)])


def timed(problem, method, cfg, repeat=1):
    """Median wall time over ``repeat`` runs (the cores are shared: medians resist other jobs' spikes)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = merge_offsets([problem], method, cfg, progress=False)[problem.key]
        times.append(time.perf_counter() - t)
    return statistics.median(times), r


def timed_paper(problem, steps):
    """Paper mode run for ``steps`` AdamW steps; its time for the official 50 is 50 x the median step
    (step = loss evaluation + backward + AdamW update, timed between consecutive callbacks)."""
    stamps = []
    cfg = {"mode": "paper", "steps": steps}
    t = time.perf_counter()
    r = merge_offsets(
        [problem], "loraclr", cfg, callback=lambda *_: stamps.append(time.perf_counter()), progress=False
    )[problem.key]
    wall = time.perf_counter() - t
    stamps.append(t + wall)
    per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return 50 * per_step, wall, r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--timesteps", type=int, default=2, help="of the official 20 (spatial rows scale)")
    ap.add_argument("--layers", default="all", help="comma-separated indices into the layer list, or 'all'")
    ap.add_argument("--variants", action="store_true", help="also time converged with token / normalize")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "solve_speed"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--paper-steps", type=int, default=50, help="steps actually run (time is 50 x median)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each fast solver (median reported)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = range(len(LAYERS)) if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    variants = [("converged", {"mode": "converged"}), ("lstsq", None)]
    if args.variants:
        variants += [
            ("converged token", {"mode": "converged", "distance": "token"}),
            ("converged normalize", {"mode": "converged", "normalize": True}),
            ("converged token+normalize", {"mode": "converged", "distance": "token", "normalize": True}),
        ]
    rows_out = []
    for li in chosen:
        name, d_in, d_out, rows, spatial = LAYERS[li]
        n_rows = rows * args.timesteps // 20 if spatial else rows
        p = make_problem(name, d_in, d_out, n_rows, args.concepts, args.rank, seed=li)
        t_paper, wall_paper, r_paper = timed_paper(p, args.paper_steps)
        entry = {
            "layer": name,
            "in": d_in,
            "out": d_out,
            "rows_per_concept": n_rows,
            "paper_s": t_paper,
            "paper_wall_s": wall_paper,
            "paper_steps_run": args.paper_steps,
            "paper_loss": r_paper.report["loss"],
            "paper_hinge_active": r_paper.report["hinge_active"],
            "paper_best_is_last": r_paper.report["best_is_last"],
            "solvers": {},
        }
        print(
            f"{name}: rows/concept {n_rows}; paper {t_paper:.2f} s, loss {r_paper.report['loss']:.6g}",
            flush=True,
        )
        for label, cfg in variants:
            method = "lstsq" if label == "lstsq" else "loraclr"
            t, r = timed(p, method, cfg, args.repeat)
            rep = r.report
            # objective of the paper's settings at this solution (same objective for paper / converged)
            entry["solvers"][label] = {
                "seconds": t,
                "speedup_vs_paper": t_paper / t,
                "loss": rep.get("loss"),
                "converged": rep.get("converged"),
                "steps": rep.get("steps"),
                "hinge_active": rep.get("hinge_active"),
                "max_abs_diff_vs_paper_offset": float((r.offset - r_paper.offset).abs().max()),
            }
            loss = f"{rep['loss']:.6g}" if rep.get("loss") is not None else "-"
            print(
                f"   {label:26s} {t:8.3f} s  x{t_paper / t:7.1f}  loss {loss}  "
                f"steps {rep.get('steps')}  hinge {rep.get('hinge_active')}",
                flush=True,
            )
        rows_out.append(entry)
    tot_paper = sum(e["paper_s"] for e in rows_out)
    tot_conv = sum(e["solvers"]["converged"]["seconds"] for e in rows_out)
    meta = {
        "concepts": args.concepts,
        "rank": args.rank,
        "timesteps_of_20": args.timesteps,
        "paper_steps_run": args.paper_steps,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "machine": platform.processor() or platform.machine(),
        "load_average_at_end": list(os.getloadavg()),
        "command": "python bench/solve_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "total_paper_s": tot_paper,
        "total_converged_s": tot_conv,
        "total_speedup": tot_paper / tot_conv,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / (out.name + ".json")).write_text(json.dumps({"meta": meta, "layers": rows_out}, indent=2))
    labels = [label for label, _ in variants]
    md = [
        "# Per-layer solve speed: LoRACLR paper (official: full blocks, 50 AdamW steps) vs converged vs lstsq",
        "",
        f"{args.concepts} concepts, random rank-{args.rank} LoRAs, SD 1.5 layer shapes, spatial rows = "
        f"positions x {args.timesteps} of the official 20 timesteps; CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads on shared cores (load average at the end "
        f"{os.getloadavg()[0]:.1f}). Paper time = 50 x its median AdamW step ({args.paper_steps} steps run; "
        f"its loss is the best after those steps); other solvers: median of {args.repeat} runs. Speed-up over "
        "paper in brackets; loss = each solver's own objective (paper and converged: the official one).",
        "",
        "| layer | rows/concept | paper s (loss) | "
        + " | ".join(f"{lb} s (x) (loss)" for lb in labels)
        + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for e in rows_out:
        cells = []
        for lb in labels:
            s = e["solvers"][lb]
            loss = f"{s['loss']:.4g}" if s["loss"] is not None else "-"
            cells.append(f"{s['seconds']:.2f} (x{s['speedup_vs_paper']:.0f}) ({loss})")
        md.append(
            f"| {e['layer']} | {e['rows_per_concept']} | {e['paper_s']:.2f} ({e['paper_loss']:.4g}) | "
            + " | ".join(cells)
            + " |"
        )
    md += [
        "",
        f"Command: `{meta['command']}`.",
        f"Total: paper {tot_paper:.1f} s, converged {tot_conv:.1f} s, speed-up x{tot_paper / tot_conv:.1f}.",
        "lstsq's loss is its mean squared error; the token / normalize variants report their own objective.",
    ]
    (out.parent / (out.name + ".md")).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
