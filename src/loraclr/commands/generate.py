"""``loraclr generate MODEL PROMPT...``: images from a merged output, or a base model plus LoRAs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a `loraclr merge` output folder, a diffusers folder, a checkpoint or 'mini'")
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="prompts; with a merged output, {concept} is replaced by the concept's trigger")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA to stack on the model (repeatable; naive sum of deltas)")
    p.add_argument("-n", "--num", type=int, default=1, help="images per prompt (seeds SEED, SEED+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--size", help="HxW in pixels (default: the model's native size)")
    p.add_argument("--grid", help="also save a grid image here (rows = prompts, columns = seeds)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .pt/.pth LoRA files (weights-only)")
    p.add_argument("--base-config", help="diffusers folder with the configs of a single-file checkpoint")
    p.add_argument("-o", "--out", required=True, help="folder for the images")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def run(args) -> int:
    from loraclr.commands.merge import quiet_libraries
    from loraclr.pipeline import generate, load_model, parse_lora_arg, parse_size

    if getattr(args, "quiet", False):
        quiet_libraries()
    if args.num < 1 or args.steps < 1:
        raise ValueError("-n and --steps must be >= 1")
    size = parse_size(args.size) if args.size else None
    loras = [parse_lora_arg(x) for x in args.lora]
    model = load_model(args.model, loras, allow_pickle=args.allow_pickle, config=args.base_config)
    out = Path(args.out)
    images = generate(model, args.prompts, n=args.num, seed=args.seed, negative=args.negative,
                      guidance=args.guidance, steps=args.steps, size=size, out_dir=out, grid=args.grid,
                      progress=not getattr(args, "quiet", False))
    print(f"wrote {len(images)} images to {out}")
    return 0
