"""``loraclr generate MODEL PROMPT...``: images from a merged output, or a base model plus LoRAs.

With regions, each character gets a box and its own prompt (``loraclr.regional``)::

    loraclr generate merged/ "{rubo} on the left and {rika} on the right at the beach" \
        --region "0,0.25,0.5,1:{rubo} at the beach" --region "0.5,0.25,1,1:{rika} at the beach" -o out/
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraclr.regional import DEFAULT_MODE, DEFAULT_START, MODES
from loraclr.runtime import add_runtime_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a `loraclr merge` output folder, a diffusers folder, a checkpoint or 'mini'")
    p.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="prompts; with a merged output, {concept} is replaced by the concept's trigger "
                        "(optional when a --regions file gives the prompt)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA to stack on the model (repeatable; naive sum of deltas)")
    p.add_argument("-n", "--num", type=int, default=1, help="images per prompt (seeds SEED, SEED+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--size", help="HxW in pixels (default: the model's native size)")
    p.add_argument("--grid", help="also save a grid image here (rows = prompts, columns = seeds)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .pt/.pth/.ckpt/.bin LoRA files (weights-only)")
    p.add_argument("--base-config", help="diffusers folder with the configs of a single-file checkpoint")
    r = p.add_argument_group("regions (one box and prompt per character; see loraclr.regional)")
    r.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1:PROMPT",
                   help="a box in fractions of the image (0,0 = top left) and the prompt inside it (repeatable)")
    r.add_argument("--regions", metavar="FILE", help="a YAML/JSON regions file: prompt, negative, mode, start and "
                   "regions: [{box: [x0, y0, x1, y1], prompt: ..., negative: ...}]")
    r.add_argument("--region-mode", choices=MODES, default=None,
                   help="attention: each box's queries attend to its prompt (Mix-of-Show); noise: one noise "
                        f"prediction per region blended by the boxes (area conditioning). Default: {DEFAULT_MODE}")
    r.add_argument("--region-start", type=float, default=None, metavar="FRACTION",
                   help=f"fraction of the steps drawn with the global prompt alone first (default {DEFAULT_START})")
    s_ = p.add_argument_group("structure (ControlNet / T2I-Adapter)")
    s_.add_argument("--structure", metavar="DIR", help="a local diffusers ControlNet or T2I-Adapter folder, or "
                    "'layout' for the miniature world's layout adapter (drawn from the region boxes)")
    s_.add_argument("--structure-image", metavar="IMAGE", help="the condition image (e.g. an openpose map); "
                    "without one the layout is drawn from the region boxes")
    s_.add_argument("--structure-scale", type=float, default=1.0, help="conditioning scale (default 1.0)")
    add_runtime_arguments(p, precision_default="fp32",
                          precision_help="the weights' dtype while drawing (default: fp32, comparable across machines)")
    p.add_argument("-o", "--out", required=True, help="folder for the images")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def run(args) -> int:
    from loraclr.pipeline import generate
    from loraclr.runtime import apply_runtime, quiet_libraries

    if getattr(args, "quiet", False):
        quiet_libraries()
    runtime = apply_runtime(args)
    request = build_request(args)
    model = request.load(runtime["precision"])
    out = Path(args.out)
    images = generate(model, request.prompts, out_dir=out, grid=args.grid,
                      progress=not getattr(args, "quiet", False), **request.options)
    print(f"wrote {len(images)} images to {out}")
    return 0


@dataclass
class GenerateRequest:
    """What ``generate`` was asked for, checked: the model to load and the arguments of
    :func:`loraclr.pipeline.generate`. The web page builds it from the same argument list, so that its images
    are the command's."""

    model: str
    loras: list[tuple[str, float]]
    allow_pickle: bool
    base_config: str | None
    prompts: list[str]
    options: dict[str, Any]  # n, seed, negative, guidance, steps, size, regions, structure, structure_image

    def load(self, precision: torch.dtype | None = None):
        from loraclr.pipeline import load_model

        return load_model(self.model, self.loras, allow_pickle=self.allow_pickle, config=self.base_config,
                          dtype=precision or torch.float32)


def build_request(args) -> GenerateRequest:
    """The checked request of parsed ``generate`` arguments (every user error is raised here, before loading)."""
    from loraclr.pipeline import parse_lora_arg, parse_size

    if args.num < 1 or args.steps < 1:
        raise ValueError("-n and --steps must be >= 1")
    size = parse_size(args.size) if args.size else None
    prompts, negative, plan = regional_arguments(args)
    structure, image = None, None
    if args.structure:
        from loraclr.structure import load_structure

        structure = load_structure(args.structure, scale=args.structure_scale)
        if args.structure_image:
            image = _open_image(args.structure_image)
    elif args.structure_image:
        raise ValueError("--structure-image needs --structure DIR")
    loras = [parse_lora_arg(x) for x in args.lora]
    options = dict(n=args.num, seed=args.seed, negative=negative, guidance=args.guidance, steps=args.steps,
                   size=size, regions=plan, structure=structure, structure_image=image)
    return GenerateRequest(args.model, loras, args.allow_pickle, args.base_config, prompts, options)


def regional_arguments(args):
    """(prompts, negative prompt, RegionalPlan or None) from the command line and the regions file; flags win."""
    from loraclr.regional import RegionalPlan, load_regions, parse_region

    spec = load_regions(args.regions) if args.regions else {}
    regions = list(spec.get("regions", [])) + [parse_region(t) for t in args.region]
    prompts = list(args.prompts) or ([spec["prompt"]] if spec.get("prompt") else [])
    if not prompts:
        raise ValueError("give a PROMPT (or a regions file with a 'prompt')")
    negative = args.negative if args.negative else spec.get("negative", "")
    if not regions:
        if args.region_mode or args.region_start is not None:
            raise ValueError("--region-mode / --region-start need regions (--region or --regions FILE)")
        return prompts, negative, None
    mode = args.region_mode or spec.get("mode", DEFAULT_MODE)
    start = args.region_start if args.region_start is not None else float(spec.get("start", DEFAULT_START))
    return prompts, negative, RegionalPlan(tuple(regions), mode=mode, start=start)


def _open_image(path: str):
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: condition image not found")
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: not an image ({e})") from None
