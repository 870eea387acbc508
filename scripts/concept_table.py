"""The per-concept table of the world's concepts README, from `loraclr evaluate --json` results.

    loraclr evaluate mini --own-loras --allow-pickle --suite single --prompts 4 --seeds 32 --json own.json
    loraclr evaluate mini --own-loras --allow-pickle --suite single --prompts 4 --seeds 32 --seed 100 --json val.json
    loraclr evaluate mini --allow-pickle --suite single --prompts 4 --seeds 8 --json base.json
    python scripts/concept_table.py --own own.json --validation val.json --base base.json [--manifest M] [--md OUT]

Prints one row per concept of the manifest (format, rank, steps, token warmup, trigger; identity with its 95 %
interval for the own LoRA, the validation seeds and the base; text and image alignment own / base) and the
summary against the world's bar (each identity >= 0.8 with its own LoRA, the base <= 0.1: the LoRAs teach
something the base model cannot draw).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BAR, BASE_BAR = 0.8, 0.1


def per_concept(paths) -> dict[str, dict]:
    """name -> {"identity": {mean, low, high, n}, "text": ..., "image": ...} of `loraclr evaluate --json` files
    (one path or several, e.g. runs on groups of concepts; a concept in two files is refused)."""
    if paths is None:
        return {}
    out: dict[str, dict] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        for result in doc["results"]:
            if result.get("suite") != "single":
                raise ValueError(f"{path}: expected single-suite results, found suite {result.get('suite')!r}")
            twice = sorted(set(out) & set(result["per_concept"]))
            if twice:
                raise ValueError(f"{path}: concepts {twice} are scored in an earlier file too")
            out.update(result["per_concept"])
    return out


def _ci(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "-"
    return f"{m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"


def _mean(m: dict | None) -> str:
    return "-" if not m or m.get("mean") is None else f"{m['mean']:.2f}"


def table(manifest: dict, own: dict, validation: dict, base: dict) -> tuple[str, list[str]]:
    """The markdown table and the summary lines."""
    head = ("| concept | kind | format | rank | steps | token warmup | trigger | identity (own LoRA) | "
            "identity, validation seeds | identity (base) | text own / base | image own / base |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    scored, base_max = [], 0.0  # identities with an own-LoRA score; the base's highest identity
    for e in manifest["concepts"]:
        name = e["name"]
        o, v, b = own.get(name, {}), validation.get(name, {}), base.get(name, {})
        identity = e["kind"] == "identity"
        rows.append(
            f"| {name} | {e['kind']} | {e['format']} | {e['rank']} | {e.get('steps', '-')} | "
            f"{e.get('token_warmup', 0) or '-'} | `{e['trigger']}` | {_ci(o.get('identity')) if identity else '-'} | "
            f"{_mean(v.get('identity')) if identity else '-'} | {_ci(b.get('identity')) if identity else '-'} | "
            f"{_mean(o.get('text'))} / {_mean(b.get('text'))} | {_mean(o.get('image'))} / {_mean(b.get('image'))} |")
        if identity and o.get("identity"):
            scored.append(name)
            if b.get("identity"):
                base_max = max(base_max, b["identity"]["mean"])
    summary = []
    if scored:
        ids = {n: own[n]["identity"]["mean"] for n in scored}
        failed = [f"{n} {m:.2f}" for n, m in ids.items() if m < BAR]
        summary.append(f"Identities at or above {BAR} with their own LoRA: {len(ids) - len(failed)} of {len(ids)}; "
                       f"mean {sum(ids.values()) / len(ids):.2f}; below: {', '.join(failed) or 'none'}.")
        val = [validation[n]["identity"]["mean"] for n in scored if validation.get(n, {}).get("identity")]
        if val:
            summary.append(f"Validation seeds: mean {sum(val) / len(val):.2f}, "
                           f"{sum(x >= BAR for x in val)} of {len(val)} at or above {BAR}.")
        if base:
            summary.append(f"Base without LoRAs: highest identity {base_max:.2f} (bar <= {BASE_BAR}).")
    return "\n".join(rows), summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=None, help="concept manifest (default: the built-in world's)")
    p.add_argument("--own", type=Path, nargs="+", required=True,
                   help="`loraclr evaluate --own-loras --json` results (several files: groups of concepts)")
    p.add_argument("--validation", type=Path, nargs="+", help="the same on validation seeds (--seed 100)")
    p.add_argument("--base", type=Path, nargs="+", help="`loraclr evaluate` results of the base without LoRAs")
    p.add_argument("--md", type=Path, help="also write the table and summary here")
    args = p.parse_args(argv)
    if args.manifest is None:
        from loraclr.evaluate import WORLD_MANIFEST

        args.manifest = Path(WORLD_MANIFEST)
    manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
    text, summary = table(manifest, per_concept(args.own), per_concept(args.validation), per_concept(args.base))
    out = text + "\n\n" + "\n".join(summary) + "\n"
    sys.stdout.write(out)
    if args.md:
        args.md.write_text(out, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
