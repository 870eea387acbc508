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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "src" / "loraclr" / "world" / "assets" / "mini-sd"


def ceiling(names: list[str], n: int = 200, seed: int = 9000, vae=None) -> dict[str, dict[str, float]]:
    """name -> {"clean": recognition rate of clean renders, "vae": of their VAE round trips}."""
    from diffusers import AutoencoderKL

    from loraclr.evaluate import metrics, regions
    from loraclr.evaluate.train import camera_roundtrip
    from loraclr.evaluate.world import identity_references, load_world_evaluator, to_tensor
    from loraclr.world import scenes as S

    unknown = [x for x in names if x not in S.CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concepts {unknown}; the world's identities are {list(S.CONCEPTS)}")
    ident = load_world_evaluator().identity
    all_names = list(S.CONCEPTS)
    refs = identity_references(ident, [S.CONCEPTS[x] for x in all_names])
    vae = vae if vae is not None else AutoencoderKL.from_pretrained(str(BASE), subfolder="vae")
    out = {}
    for name in names:
        k = all_names.index(name)
        imgs, boxes = [], []
        for r, i in S.identity_samples(S.CONCEPTS[name], n, seed=seed, n_chars_p=(1.0, 0.0, 0.0)):
            chars = r.scene.ordered()
            imgs.append(r.image)
            boxes.append(regions.region(len(chars), chars[i].slot))
        clean = np.stack(imgs)
        seen = camera_roundtrip(torch.from_numpy(clean), vae).numpy()
        rates = {}
        for label, x in (("clean", clean), ("vae", seen)):
            d = metrics.distances(ident.embed_regions(to_tensor(list(x)), torch.tensor(boxes)), refs)
            ok = metrics.recognised(d, torch.full((len(d),), k), ident.threshold)
            rates[label] = float(ok.float().mean())
        out[name] = rates
    return out


def main(argv: list[str] | None = None) -> int:
    from loraclr.world import scenes as S

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="renders per concept")
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--concepts", default=",".join(S.CONCEPTS), help="comma-separated (default: every identity)")
    ap.add_argument("--md", help="also write the table here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
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
