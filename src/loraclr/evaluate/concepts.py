"""Concepts to evaluate: how each is called in prompts, how it is described in ordinary words, and what it
should look like (reference images).

The concept manifest (``loraclr/world/assets/concepts/manifest.json`` for the built-in world) lists
``{"name", "kind": "identity" | "style", "identity", "style", "trigger", "file", "format"}`` per concept.
Real users write the same file with ``"description"`` (ordinary words for text alignment, e.g. "a woman with
red hair") and ``"references"`` (a folder of images of the concept) instead of world keys.

Text alignment needs ordinary words: neither our CLIP nor a real one knows a LoRA's trigger word, so prompts
are scored with each trigger replaced by its concept's description (LoRACLR and Mix-of-Show do the same with
the class word).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraclr.evaluate.base import to_tensor
from loraclr.world import scenes as S

WORLD_MANIFEST = Path(__file__).resolve().parents[1] / "world" / "assets" / "concepts" / "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    kind: str  # "identity" | "style"
    trigger: str
    description: str
    identity: str | None = None  # a key of scenes.CONCEPTS (world)
    style: str | None = None  # a scenes.STYLES name (world)
    file: Path | None = None  # the concept's own LoRA
    references: Path | None = None  # a folder of reference images (real models)
    phrase: str | None = None  # how prompts call it, "{trigger}" for the trigger (default: see prompt_phrase)

    def prompt_phrase(self, trigger: str | None = None) -> str:
        """The words that call the concept in a prompt, with ``trigger`` (default: the manifest's).

        As the world's LoRAs are trained (``loraclr train-lora``): an identity ``t`` is "a t creature" in
        captions, a style's content words are swapped for its trigger ("as a mosaic"); a manifest ``phrase``
        (e.g. ``"photo of {trigger} woman"``) overrides both. Real concepts default to the trigger alone.
        """
        t = self.trigger if trigger is None else trigger
        if self.phrase is not None:
            return self.phrase.replace("{trigger}", t)
        if self.kind == "identity" and self.identity:
            return t if t.startswith("a ") else f"a {t} creature"
        if self.kind == "style" and self.style:
            words = S.STYLE_PHRASE[self.style].split()
            content = " ".join(w for w in words if w not in _STYLE_STOP)
            return S.STYLE_PHRASE[self.style].replace(content, t) if content else t
        return t


_STYLE_STOP = ("in", "as", "a", "style")  # the words a style's trigger leaves in place (training.data)


def style_phrase(style: str) -> str:
    """The caption words of a world style, e.g. ``"as a mosaic"``."""
    return S.STYLE_PHRASE[style]


def load_manifest(path: str | Path = WORLD_MANIFEST) -> list[ConceptSpec]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: concept manifest not found (the world's concept LoRAs are not "
                                "trained yet, or pass --manifest)")
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, c in enumerate(data.get("concepts", [])):
        where = f"{path}: concepts[{i}]"
        for key in ("name", "kind", "trigger"):
            if key not in c:
                raise ValueError(f"{where}: missing {key!r}")
        kind = c["kind"]
        if kind not in ("identity", "style"):
            raise ValueError(f"{where} ({c['name']}): kind {kind!r} is not 'identity' or 'style'")
        desc = c.get("description")
        if desc is None and kind == "identity" and c.get("identity"):
            desc = S.caption_identity(S.concept(c["identity"]))
        if desc is None and kind == "style" and c.get("style"):
            if c["style"] not in S.STYLES:
                raise ValueError(f"{where} ({c['name']}): unknown style {c['style']!r}; known {S.STYLES}")
            desc = style_phrase(c["style"])
        if desc is None:
            raise ValueError(f"{where} ({c['name']}): no 'description' and no world identity/style to derive "
                             "one from; text alignment needs ordinary words for the concept")
        refs = c.get("references")
        out.append(ConceptSpec(
            name=c["name"], kind=kind, trigger=c["trigger"], description=desc, identity=c.get("identity"),
            style=c.get("style"), file=(path.parent / c["file"]) if c.get("file") else None,
            references=(path.parent / refs) if refs else None, phrase=c.get("phrase")))
    if not out:
        raise ValueError(f"{path}: no concepts")
    return out


def select(concepts: list[ConceptSpec], names: list[str] | None) -> list[ConceptSpec]:
    if not names:
        return concepts
    by = {c.name: c for c in concepts}
    missing = [n for n in names if n not in by]
    if missing:
        raise ValueError(f"unknown concepts {missing}; the manifest has {sorted(by)}")
    return [by[n] for n in names]


def reference_images(spec: ConceptSpec, n: int = 8, seed: int = 0) -> torch.Tensor:
    """(R, 3, H, W) images of what the concept should look like."""
    if spec.references is not None:
        from PIL import Image

        files = sorted(p for p in Path(spec.references).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{spec.references}: no reference images for concept {spec.name!r}")
        ims = [Image.open(f).convert("RGB") for f in files]
        size = ims[0].size
        return to_tensor([im.resize(size) for im in ims])
    if spec.kind == "identity" and spec.identity:
        return to_tensor([r.image for r in S.reference_renders(S.concept(spec.identity), n, seed)])
    if spec.kind == "style" and spec.style:
        rng = np.random.default_rng([seed, 5150])
        scenes = [S.sample_base_scene(rng, styled=0.0) for _ in range(n)]
        return to_tensor([S.render(S.Scene(s.characters, s.background, spec.style), seed=k).image
                          for k, s in enumerate(scenes)])
    raise ValueError(f"concept {spec.name!r}: no reference images (give 'references' in the manifest)")
