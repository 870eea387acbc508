"""``loraclr demo``: merge, draw and score look-alike concepts of the built-in miniature world (see
:mod:`loraclr.demo`). Writes ``grid.png``, ``metrics.md`` / ``metrics.json`` and the merged models to ``--out``.
"""

from __future__ import annotations

import argparse
import logging

from loraclr.runtime import add_runtime_arguments, apply_runtime, quiet_libraries


def add_arguments(p: argparse.ArgumentParser) -> None:
    from loraclr.demo import DEMO_REGIONS, DEMO_STRUCTURE
    from loraclr.regional import MODES

    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out); must be empty or new")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (its cached quick LoRAs are reused when they still match)")
    p.add_argument("--base", default="mini", help="base model (default: the built-in mini SD)")
    p.add_argument("--manifest", help="concept manifest JSON (default: the world's shipped concepts)")
    p.add_argument("--concepts", help="comma-separated concept names (default: rubo,rika,rono, look-alikes)")
    p.add_argument("--methods", default="loraclr",
                   help="comma-separated merge methods, one column each (default: loraclr; e.g. loraclr,lstsq)")
    p.add_argument("--quick-steps", type=int, help="training steps of each quick LoRA (when none are shipped)")
    p.add_argument("--prompts", type=int, help="prompts per concept in the single-concept suite")
    p.add_argument("--seeds", type=int, help="images per prompt")
    p.add_argument("--pairs", type=int, help="two-concept prompts")
    p.add_argument("--triples", type=int, help="three-concept prompts")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, help="first seed")
    p.add_argument("--evaluators", metavar="DIR", help="folder of world evaluator weights (default: built-in)")
    p.add_argument("--region-mode", dest="regions", choices=(*MODES, "none"), default=None,
                   help=f"how multi-concept rows bind each character to its box (default: {DEMO_REGIONS})")
    p.add_argument("--region-start", type=float, default=None, metavar="FRACTION",
                   help="fraction of the steps drawn with the global prompt alone first")
    p.add_argument("--structure", default=None, help="structure condition for the regional rows: 'layout' (the "
                   f"world's layout adapter), a ControlNet / T2I-Adapter folder, or 'none' (default: {DEMO_STRUCTURE})")
    # --threads defaults to the free cores: on a loaded machine more threads than free cores slow every step
    add_runtime_arguments(p, precision_help="here the quick LoRAs' training (default: auto)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars, no notices from the model libraries")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def run(args) -> int:
    import dataclasses

    from loraclr.demo import DemoConfig, run_demo

    quiet = getattr(args, "quiet", False)
    # the demo's own bars show progress; per-model loading bars and a log line per image would bury them
    quiet_libraries(notices=quiet)
    if getattr(args, "verbose", 0) < 1:
        logging.getLogger("loraclr.pipeline").setLevel(logging.WARNING)
    apply_runtime(args)
    config = DemoConfig(base=args.base, manifest=args.manifest, concepts=_names(args.concepts),
                        methods=_names(args.methods))
    changes = {"n_prompts": args.prompts, "seeds": args.seeds, "n_pairs": args.pairs, "n_triples": args.triples,
               "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "evaluators": args.evaluators}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    if args.regions is not None:
        config = dataclasses.replace(config, regions=None if args.regions == "none" else args.regions)
    if args.structure is not None:
        config = dataclasses.replace(config, structure=None if args.structure == "none" else args.structure)
    if args.region_start is not None:
        config = dataclasses.replace(config, region_start=args.region_start)
    config.validate()
    if args.quick_steps is not None:
        config = dataclasses.replace(config, quick=dataclasses.replace(config.quick, steps=args.quick_steps))
    result = run_demo(config, args.out, progress=not quiet, overwrite=args.overwrite)
    print(result.markdown)
    print(f"grid:    {result.grid}\ntable:   {result.table_md} (and {result.table_json.name})\n"
          f"merged:  {', '.join(str(result.out_dir / f'merged-{m}') for m in config.methods)}\n"
          f"time:    {result.timings['total']:.0f} s")
    return 0
