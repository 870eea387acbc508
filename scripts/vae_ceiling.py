"""How well the world's VAE lets each identity be recognised: the ceiling of the single-concept suite.

    python scripts/vae_ceiling.py                      # 200 renders per concept, every concept
    python scripts/vae_ceiling.py --n 400 --concepts tobi,gaso --md OUT

The single suite (`loraclr evaluate --suite single`) scores one-character images, and the model can only draw what
its VAE decodes. So this renders ``--n`` held-out one-character scenes per concept (seed ``--seed``, not the seeds
the evaluators were trained or calibrated on), round-trips them through the shipped VAE (latent mean, decoded), and
scores both the clean renders and the round trips with the shipped identity evaluator at its threshold, in the
character's region, as the suite does. A LoRA's identity alignment can at best approach the round-trip column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "src" / "loraclr" / "world" / "assets" / "mini-sd"


def ceiling(names: list[str], n: int = 200, seed: int = 9000, vae=None) -> dict[str, dict[str, float]]:
    """name -> {"clean": recognition rate of clean renders, "vae": of their VAE round trips}.

    The renders and the rule are the evaluator calibration's (``loraclr.evaluate.world.calibrate``, whose camera
    report does the same on mixed layouts), with one character per scene as in the single suite."""
    from diffusers import AutoencoderKL

    from loraclr.evaluate import metrics
    from loraclr.evaluate.world import _sample_embeddings, identity_references, load_world_evaluator
    from loraclr.world import scenes as S

    unknown = [x for x in names if x not in S.CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concepts {unknown}; the world's identities are {list(S.CONCEPTS)}")
    ident = load_world_evaluator().identity
    all_names = list(S.CONCEPTS)
    refs = identity_references(ident, [S.CONCEPTS[x] for x in all_names])
    vae = vae if vae is not None else AutoencoderKL.from_pretrained(str(BASE), subfolder="vae")
    owner = torch.tensor([all_names.index(x) for x in names])  # index of each asked concept among all
    out: dict[str, dict[str, float]] = {x: {} for x in names}
    for label, camera in (("clean", None), ("vae", vae)):
        emb, who, _ = _sample_embeddings(ident, [S.CONCEPTS[x] for x in names], n, seed=seed,
                                         n_chars_p=(1.0, 0.0, 0.0), camera=camera)
        ok = metrics.recognised(metrics.distances(emb, refs), owner[who], ident.threshold)
        for k, name in enumerate(names):
            out[name][label] = float(ok[who == k].float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    from loraclr.world import scenes as S

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="renders per concept")
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--concepts", default=",".join(S.CONCEPTS), help="comma-separated (default: every identity)")
    ap.add_argument("--md", help="also write the table here")
    args = ap.parse_args(argv)
    res = ceiling([x.strip() for x in args.concepts.split(",") if x.strip()], n=args.n, seed=args.seed)
    lines = [f"Identity recognised in {args.n} one-character renders per concept (seed {args.seed}), shipped "
             "identity evaluator at its threshold", "",
             "| concept | clean renders | VAE round trip (the ceiling) |", "|---|---|---|"]
    lines += [f"| {k} | {v['clean']:.3f} | {v['vae']:.3f} |" for k, v in res.items()]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.md:
        from loraclr.io.safe import atomic_write

        with atomic_write(args.md) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
