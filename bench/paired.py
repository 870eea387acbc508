"""Paired differences between methods of one ``bench/quality.py`` results file, pooled over its N.

Every method of a sweep draws the same subsets, prompts and seeds, so each single-concept image of one method has
a twin in every other. Against a reference label, per other label: the mean difference of the identity embedder's
distance to the intended identity (lower is better) and of the recognised rate over all twin pairs, with
percentile-bootstrap 95 % intervals. The per-N tables of ``quality.md`` compare each method with the own LoRAs
only; this is the method-against-method view that decides a default.

    python bench/paired.py bench/results/quality_defaults.json --reference loraclr-conv-mean-ridge1e-1

Writes ``<results>_paired_<reference>.md`` beside the results file and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the sweep's image key and bootstrap statistics)


def twins(doc: dict) -> dict[str, dict[tuple, dict]]:
    """label -> {(subset, concept, scored text, seed): image record} over the single suites of all units."""
    out: dict[str, dict[tuple, dict]] = {}
    for u in doc["units"]:
        if "error" in u:
            continue
        for r in u["single"]["images"]:
            out.setdefault(u["label"], {})[(tuple(u["subset"]), *Q.image_key(r))] = r
    return out


def paired(doc: dict, reference: str) -> list[dict]:
    by = twins(doc)
    if reference not in by:
        raise SystemExit(f"no label {reference!r} in the results; labels: {sorted(by)}")
    ref = by[reference]
    rows = []
    for label, recs in by.items():
        if label == reference:
            continue
        keys = [k for k in recs if k in ref and recs[k].get("identity_distance") and ref[k].get("identity_distance")]
        if not keys:
            continue
        d = [recs[k]["identity_distance"][0] - ref[k]["identity_distance"][0] for k in keys]
        i = [float(recs[k]["identity"][0]) - float(ref[k]["identity"][0]) for k in keys]
        rows.append({"label": label, "pairs": len(keys), "distance": Q.stat(d), "identity": Q.stat(i)})
    return rows


def render(rows: list[dict], reference: str, source: str) -> str:
    md = [f"# Paired differences against `{reference}` (`{source}`, all N pooled)", "",
          "Per label: mean over twin images (same subset, concept, prompt and seed) of its value minus the "
          "reference's, 95 % bootstrap interval. Distance: the identity embedder's distance to the intended identity "
          "(negative = closer = better). Identity: recognised (1) or not (0).", "",
          "| label | pairs | distance - reference | identity - reference |", "|---|---|---|---|"]
    for r in rows:
        d = r["distance"]
        md.append(f"| {r['label']} | {r['pairs']} | {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | "
                  f"{Q._fd(r['identity'])} |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a bench/quality.py .json")
    ap.add_argument("--reference", default="loraclr-conv-mean-ridge1e-1", help="the label the others are compared to")
    args = ap.parse_args(argv)
    path = Path(args.results)
    md = render(paired(json.loads(path.read_text(encoding="utf-8")), args.reference), args.reference, str(path))
    path.with_name(f"{path.stem}_paired_{args.reference}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
