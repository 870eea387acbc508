"""Train the miniature world's base model from scratch (see src/loraclr/world/training.py).

    python scripts/train_world.py vae   [--steps 700]            # ~12 min on 2 cores -> runs/world/vae
    python scripts/train_world.py decoder [--steps 1500]         # optional, in parallel with base
    python scripts/train_world.py render [--n 30000]             # optional, in parallel with vae: render
    python scripts/train_world.py data  [--n 30000]              # render + encode the dataset (cached)
    python scripts/train_world.py base  [--minutes 100]          # text encoder + UNet, resumable
    python scripts/train_world.py all                             # the three in order

The base stage writes src/loraclr/world/assets/mini-sd (fp16 pipeline folder + training_state.json) every
~12 minutes; run it again (same command) to resume from that folder. Logs go to runs/world/*.log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "world"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "decoder", "render", "data", "base", "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=700, help="VAE steps")
    p.add_argument("--n", type=int, default=30000, help="dataset size (scenes)")
    p.add_argument("--minutes", type=float, default=100.0, help="wall-clock budget of this base run")
    p.add_argument("--total-steps", type=int, default=None,
                   help="length of the base LR schedule (default: the saved one when resuming, else 3000)")
    p.add_argument("--batch", type=int, default=16, help="base batch size")
    p.add_argument("--lr", type=float, default=4e-4, help="base peak learning rate")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    p.add_argument("--stream", action="store_true",
                   help="base: render + encode fresh scenes every step instead of a cached dataset")
    p.add_argument("--out", type=Path, default=None, help="pipeline folder (default: the built-in asset)")
    p.add_argument("--runs", type=Path, default=RUNS, help="logs, VAE, datasets, checkpoints, sample grids")
    p.add_argument("--size", default="mini", choices=["mini", "tiny"], help="tiny: a smoke test of the script")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the VAE, encoder and base train")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering the scene pools in seeded chunks (0 = one sequential stream of "
                        "scenes; >0 changes which scenes are drawn, not how many)")
    p.add_argument("--vae-pool", type=int, default=0,
                   help="VAE: draw batches from this many pre-rendered scenes (0 = render every batch)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--fit-minutes", type=float, default=None,
                   help="base, fresh runs: cut --total-steps to what fits this many minutes (timed on the "
                        "first steps; the steps chosen are saved in training_state.json)")
    args = p.parse_args(argv)

    runs = args.runs
    runs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(runs / f"{args.stage}.log")],
    )
    torch.set_num_threads(args.threads)
    from loraclr.world import training as T
    from loraclr.world.model import BASE_MODEL_DIR

    base_pool = None  # with --workers > 1 under `all`: the base scenes render while the VAE trains
    if args.stage == "all" and args.workers > 1 and not args.stream:
        import multiprocessing as mp

        renderers = mp.get_context("spawn").Pool(max(1, args.workers - 1))
        base_pool = renderers.map_async(T._render_chunk, T.pool_jobs("base", args.n, args.seed), chunksize=1)
    if args.stage in ("vae", "all"):
        pool = None
        if args.vae_pool:
            pool = T.render_pool("vae", args.vae_pool, args.seed, max(1, args.workers))[0]
        T.train_vae(runs / "vae", steps=args.steps, seed=args.seed, batch=args.vae_batch, device=args.device,
                    pool=pool, size=args.size)
        del pool
    if args.stage == "decoder":  # optional, in parallel with base: sharpen the decoder, encoder frozen
        T.finetune_decoder(runs / "vae", steps=args.steps, seed=args.seed)
    if args.stage == "render":  # optional: render the scenes while the VAE trains (no VAE needed)
        T.render_scenes(args.n, args.seed, runs / f"scenes-{args.seed}-{args.n}.npz")
    rendered = None
    if base_pool is not None:
        rendered = T.join_chunks(base_pool.get())
        renderers.close()
    data_path = runs / (f"data-{args.seed}-{args.n}.pt" if args.workers == 0 else f"pool-{args.seed}-{args.n}.pt")
    if args.stage in ("data", "all") and not args.stream:
        T.build_dataset(runs / "vae", data_path, n=args.n, seed=args.seed, workers=args.workers,
                        device=args.device, rendered=rendered)
    if args.stage in ("base", "all"):
        T.train_base(
            vae_dir=runs / "vae", data_path=None if args.stream else data_path,
            folder=args.out or BASE_MODEL_DIR, runs_dir=runs, minutes=args.minutes,
            total_steps=args.total_steps, seed=args.seed, batch=args.batch, lr=args.lr, n=args.n,
            device=args.device, workers=args.workers, fit_minutes=args.fit_minutes, rendered=rendered,
            size=args.size,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
