"""How well can the miniature base model draw what the concept LoRAs will ask of it? A progress check for the
base training, in three columns per identity trait:

* generated: the base model given each held-out concept's full trait description ("a round red creature with
  white stripes, two eyes and a hat at the beach"), i.e. a new combination of traits it has seen;
* VAE round trip: clean renders of the concept encoded and decoded by the model's VAE (the best any image from
  this model can be);
* clean: the renders themselves (the evaluator's own limit).

With ``--own-loras`` the "generated" column is each concept drawn by the base with its own shipped LoRA from
its trigger prompt ("a rubo creature at the beach"): which traits the concept LoRAs fail to teach.

A trait counts as right when the image's identity embedding is closer to the concept than to every one-trait
variant of it that changes that trait (the near misses the identity threshold is calibrated on). Also prints
identity alignment (the evaluators' recognition rule) for the generated images.

    python scripts/probe_world.py                    # all 16 concept identities, 2 prompts x 2 seeds each
    python scripts/probe_world.py --concepts rubo,tavi --model path/to/pipeline
    python scripts/probe_world.py --own-loras --allow-pickle   # the 12 shipped identity LoRAs
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

FIELDS = ("shape", "colour", "pattern", "pattern_colour", "face", "accessory")


def changed_trait(concept, variant) -> str:
    diff = [f for f in FIELDS if getattr(variant, f) != getattr(concept, f)]
    return "pattern" if "pattern" in diff else diff[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini")
    p.add_argument("--concepts", default=None, help="comma-separated (default: all concept identities)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--own-loras", action="store_true",
                   help="generate each concept with its own LoRA of the world manifest from its trigger prompt")
    p.add_argument("--allow-pickle", action="store_true", help="--own-loras: also load the ED-LoRA .pth files")
    p.add_argument("--manifest", default=None, help="--own-loras: concept manifest (default: the shipped one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from loraclr.evaluate import load_evaluators, metrics, regions
    from loraclr.evaluate.base import to_tensor
    from loraclr.evaluate.world import identity_references
    from loraclr.pipeline import generate, load_model, resolve_base
    from loraclr.world import scenes as S
    from loraclr.world.evaluator_training import camera_roundtrip, near_misses
    from loraclr.world.model import read_training_state

    ev = load_evaluators()
    ident = ev.identity
    model = load_model(args.model, [])
    specs = {}
    if args.own_loras:
        from loraclr.evaluate import load_manifest
        from loraclr.pipeline import load_with_loras

        manifest = load_manifest(args.manifest) if args.manifest else load_manifest()
        specs = {s.identity: s for s in manifest if s.kind == "identity" and s.file is not None}
    names = args.concepts.split(",") if args.concepts else list(specs or S.CONCEPTS)
    unknown = [n for n in names if n not in S.CONCEPTS or (specs and n not in specs)]
    if unknown:
        p.error(f"--concepts: {unknown} are not world identities{' with a shipped LoRA' if specs else ''}")
    all_refs = identity_references(ident, [S.CONCEPTS[k] for k in S.CONCEPTS])
    keys = list(S.CONCEPTS)
    right = {k: {f: [] for f in FIELDS} for k in ("generated", "vae", "clean")}
    recognised = []
    per_concept: dict[str, dict] = {}  # generated images: trait -> share right, and identity alignment
    for name in names:
        c = S.CONCEPTS[name]
        near = near_misses([c])
        which = [changed_trait(c, x) for x in near]
        refs = identity_references(ident, [c] + near, n=4)
        images = []
        drawer, phrase = model, S.caption_identity(c)
        if specs:
            spec = specs[name]
            drawer = load_with_loras(args.model, [(str(spec.file), 1.0)], allow_pickle=args.allow_pickle)
            phrase = spec.prompt_phrase()
        for bg in ("at the beach", "in the snow"):
            images += generate(drawer, [f"{phrase} {bg}"], n=args.seeds, seed=0, steps=args.steps,
                               guidance=args.guidance, progress=False)
        renders = [S.render(S.Scene((S.Character(c, "middle"),), b), seed=3 + j).image
                   for j, b in enumerate(("beach", "snow", "forest", "city"))]
        seen = list(camera_roundtrip(torch.from_numpy(np.stack(renders)), model.pipe.vae).numpy())
        for kind, ims in (("generated", images), ("vae", seen), ("clean", renders)):
            box = torch.tensor([regions.region(1, "middle")] * len(ims))
            emb = ident.embed_regions(to_tensor(ims), box)
            d = metrics.distances(emb, refs)
            for f in FIELDS:
                cols = [i + 1 for i, w in enumerate(which) if w == f]
                if cols:
                    ok = (d[:, 0] < d[:, cols].min(1).values).tolist()
                    right[kind][f] += ok
                    if kind == "generated":
                        per_concept.setdefault(name, {})[f] = float(np.mean(ok))
            if kind == "generated":
                target = torch.full((len(ims),), keys.index(name))
                rec = metrics.recognised(metrics.distances(emb, all_refs), target, ident.threshold).tolist()
                recognised += rec
                per_concept.setdefault(name, {})["identity"] = float(np.mean(rec))
    step = (read_training_state(resolve_base(args.model)) or {}).get("step")  # None: not a trained folder
    table = {f: {k: float(np.mean(right[k][f])) for k in right} for f in FIELDS}
    print(f"model {args.model} (training step {step if step is not None else '?'}), {len(names)} concepts, "
          f"{2 * args.seeds} images each")
    what = "generated with its own LoRA" if specs else "generated from the description"
    print(f"| trait | {what} | VAE round trip | clean render |")
    print("|---|---|---|---|")
    for f in FIELDS:
        print(f"| {f} | {table[f]['generated']:.2f} | {table[f]['vae']:.2f} | {table[f]['clean']:.2f} |")
    print(f"identity alignment of the generated images: {np.mean(recognised):.3f}")
    cols = [f for f in FIELDS if any(f in v for v in per_concept.values())]
    print("\nper concept, generated images (share with the trait right; identity alignment):")
    print("| concept | " + " | ".join(cols) + " | identity |")
    print("|---|" + "---|" * (len(cols) + 1))
    for name, v in per_concept.items():
        print(f"| {name} | " + " | ".join(f"{v[f]:.2f}" if f in v else "-" for f in cols)
              + f" | {v['identity']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"model": args.model, "step": step, "own_loras": bool(specs), "traits": table,
                       "identity_alignment": float(np.mean(recognised)), "concepts": names,
                       "per_concept": per_concept}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
