"""``loraclr convert IN OUT --to kohya|diffusers``: rewrite a LoRA in another format, deltas unchanged."""

from __future__ import annotations

import logging

from loraclr.io import load_lora, save_lora
from loraclr.io.safe import check_output_path

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("input", help="LoRA file (kohya, diffusers, ED-LoRA with --allow-pickle, LyCORIS)")
    parser.add_argument("output", help="output .safetensors file")
    parser.add_argument("--to", required=True, choices=["kohya", "diffusers"], help="output format")
    parser.add_argument("--family", choices=["sd1", "sd2", "sdxl"],
                        help="base family (needed when the file does not say; checked against it otherwise)")
    parser.add_argument("--rank", type=int, help="rank for layers stored dense (LyCORIS); default: exact rank")
    parser.add_argument("--energy", type=float, help="keep this share of squared singular values for dense layers")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickle inputs (weights only)")


def run(args) -> int:
    check_output_path(args.output, [args.input])
    lora = load_lora(args.input, allow_pickle=args.allow_pickle, family=args.family)
    family = lora.family
    if family == "unknown":
        raise ValueError(f"{args.input}: the base family cannot be told from the file; pass --family sd1|sd2|sdxl")
    energy = args.energy if (args.rank or args.energy) else 1.0  # exact: all singular values
    report = save_lora(lora.layers, args.output, format=args.to, family=family, rank=args.rank, energy=energy,
                       tokens=lora.tokens or None, metadata={k: v for k, v in lora.metadata.items()
                                                             if k.startswith(("ss_tag_frequency", "ss_output_name",
                                                                              "modelspec.trigger_phrase"))},
                       merged_from=None)
    worst = max((v["rel_error"] for v in report.values()), default=0.0)
    log.info("converted %s (%s, %s) -> %s (%s): %d layers, worst relative error %.2e", args.input, lora.format,
             family, args.output, args.to, len(report), worst)
    print(f"wrote {args.output}: {len(report)} layers, {args.to}, {family}, worst relative error {worst:.2e}")
    return 0
