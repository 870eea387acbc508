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
    args = p.parse_args(argv)

    RUNS.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(RUNS / f"{args.stage}.log")],
    )
    torch.set_num_threads(args.threads)
    from loraclr.world import training as T
    from loraclr.world.model import BASE_MODEL_DIR

    if args.stage in ("vae", "all"):
        T.train_vae(RUNS / "vae", steps=args.steps, seed=args.seed)
    if args.stage == "decoder":  # optional, in parallel with base: sharpen the decoder, encoder frozen
        T.finetune_decoder(RUNS / "vae", steps=args.steps, seed=args.seed)
    if args.stage == "render":  # optional: render the scenes while the VAE trains (no VAE needed)
        T.render_scenes(args.n, args.seed, RUNS / f"scenes-{args.seed}-{args.n}.npz")
    if args.stage in ("data", "all") and not args.stream:
        T.build_dataset(RUNS / "vae", RUNS / f"data-{args.seed}-{args.n}.pt", n=args.n, seed=args.seed)
    if args.stage in ("base", "all"):
        T.train_base(
            vae_dir=RUNS / "vae", data_path=None if args.stream else RUNS / f"data-{args.seed}-{args.n}.pt",
            folder=args.out or BASE_MODEL_DIR, runs_dir=RUNS, minutes=args.minutes,
            total_steps=args.total_steps, seed=args.seed, batch=args.batch, lr=args.lr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
