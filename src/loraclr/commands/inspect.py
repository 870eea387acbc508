"""``loraclr inspect FILE [--json]``: what a LoRA / embedding file contains."""

from __future__ import annotations

import collections
import json
import re
import sys
from typing import Any

from loraclr.io.read import read_lora
from loraclr.lora import LoraLayer, split_key


def add_arguments(parser) -> None:
    parser.add_argument("file", help="LoRA or embedding file (.safetensors; .pt/.pth/.ckpt/.bin need --allow-pickle)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle files (weights only)")
    parser.add_argument("--family", choices=["sd1", "sd2", "sdxl"], help="expected base family (checked)")
    parser.add_argument("--modules", action="store_true", help="also list every module the file touches")


def _block(key: str) -> str:
    """Group name for a layer: component + block (``unet.down_blocks.1``, ``text_encoder.layers``)."""
    comp, path = split_key(key)
    if comp == "unet":
        m = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block|[a-z_]+)", path)
        return f"unet.{m.group(1) if m else path}"
    return f"{comp}.layers"


def _trigger_words(meta: dict[str, str]) -> list[str]:
    words: list[str] = []
    if meta.get("modelspec.trigger_phrase"):
        words += [w.strip() for w in meta["modelspec.trigger_phrase"].split(",") if w.strip()]
    freq = meta.get("ss_tag_frequency")
    if freq:
        try:
            counts: collections.Counter = collections.Counter()
            for tags in json.loads(freq).values():
                counts.update({t.strip(): int(n) for t, n in tags.items()})
            words += [t for t, _ in counts.most_common(10) if t not in words]
        except (ValueError, AttributeError, TypeError):
            pass
    return words


def summarize(path: str, allow_pickle: bool = False, family: str | None = None) -> dict[str, Any]:
    lora, report = read_lora(path, allow_pickle=allow_pickle, family=family, strict=False)
    blocks: dict[str, dict[str, Any]] = {}
    for key, layer in sorted(lora.layers.items()):
        b = blocks.setdefault(_block(key), {"modules": 0, "ranks": set(), "alphas": set(), "dense": 0})
        b["modules"] += 1
        if isinstance(layer, LoraLayer):
            b["ranks"].add(layer.rank)
            b["alphas"].add(layer.alpha)
        else:
            b["dense"] += 1
    return {
        "file": lora.source,
        "format": lora.format,
        "family": lora.family,
        "family_evidence": [f"{f}: {why}" for f, why in report.evidence],
        "components": {c: sum(1 for k in lora.layers if k.startswith(c + ".")) for c in lora.components()},
        "blocks": {k: {"modules": v["modules"], "rank": sorted(v["ranks"]), "alpha": sorted(v["alphas"]),
                       "dense": v["dense"]} for k, v in blocks.items()},
        "modules": sorted(lora.layers),
        "trigger_words": _trigger_words(lora.metadata),
        "learned_tokens": [{"name": t.name, "layerwise": t.layerwise,
                            "shape": {c: list(e.shape) for c, e in t.embeddings.items()}} for t in lora.tokens],
        "dtype": sorted(report.dtypes),
        "warnings": report.warnings,
        "metadata_keys": sorted(lora.metadata),
    }


def run(args) -> int:
    info = summarize(args.file, args.allow_pickle, args.family)
    out = sys.stdout
    if args.json:
        json.dump(info, out, indent=2)
        out.write("\n")
        return 0
    w = out.write
    w(f"file:     {info['file']}\n")
    w(f"format:   {info['format']}\n")
    w(f"family:   {info['family']}" + (f"  ({'; '.join(info['family_evidence'])})" if info["family_evidence"] else "")
      + "\n")
    w(f"dtype:    {', '.join(info['dtype'])}\n")
    if info["components"]:
        w("components: " + ", ".join(f"{c} ({n} modules)" for c, n in info["components"].items()) + "\n")
        w("blocks:\n")
        for name, b in info["blocks"].items():
            extra = f", {b['dense']} dense" if b["dense"] else ""
            w(f"  {name:<22} {b['modules']:>4} modules  rank {b['rank']}  alpha {b['alpha']}{extra}\n")
    if args.modules:
        w("modules:\n" + "".join(f"  {m}\n" for m in info["modules"]))
    if info["trigger_words"]:
        w("trigger words: " + ", ".join(info["trigger_words"]) + "\n")
    for t in info["learned_tokens"]:
        kind = "layer-wise (ED-LoRA)" if t["layerwise"] else "vectors"
        w(f"learned token: {t['name']}  {t['shape']}  {kind}\n")
    for warning in info["warnings"]:
        w(f"warning: {warning}\n")
    return 0
