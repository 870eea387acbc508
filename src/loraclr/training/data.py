"""Training data for concept LoRAs: a folder of images with captions, or the miniature world's renders.

A :class:`ConceptData` holds the concept's images and captions (the trigger already in the captions) and,
optionally, prior-preservation images with their own captions (DreamBooth's "class images": here scenes of the
base pool, so that the LoRA keeps what the base model knows).

World data (:func:`world_identity_data`, :func:`world_style_data`) comes from :mod:`loraclr.world.scenes`:
an identity's renders with its trait words replaced by the trigger phrase ("a rubox creature on the left and
a tall green creature with one eye on the right at the beach"), or styled base scenes whose captions carry the
style words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ConceptData:
    """images: (n, H, W, 3) uint8; captions: n strings (trigger included). Prior: the same, may be empty."""

    images: np.ndarray
    captions: list[str]
    prior_images: np.ndarray | None = None
    prior_captions: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.description}: images must be (n, H, W, 3) uint8, got "
                             f"{self.images.shape} {self.images.dtype}")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{self.description}: {len(self.images)} images but {len(self.captions)} captions")
        if self.prior_images is not None and len(self.prior_captions) != len(self.prior_images):
            raise ValueError(f"{self.description}: {len(self.prior_images)} prior images but "
                             f"{len(self.prior_captions)} prior captions")


# --- a folder of images with captions (generic users) --------------------------------------------------------


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)  # centre crop to a square, then resize (as most LoRA trainers do without bucketing)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def folder_data(folder: str | Path, size: int, *, default_caption: str | None = None,
                prior_folder: str | Path | None = None) -> ConceptData:
    """Images in ``folder`` with captions in ``<stem>.txt`` beside them (kohya / DreamBooth layout).

    An image without a caption file gets ``default_caption`` (e.g. "a photo of sks dog"), or raises when none
    is given. ``prior_folder``: class images with their own captions, the same layout.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    images, captions = [], []
    for f in files:
        txt = f.with_suffix(".txt")
        if txt.exists():
            caption = txt.read_text(encoding="utf-8").strip()
        elif default_caption is not None:
            caption = default_caption
        else:
            raise ValueError(f"{f}: no caption file {txt.name}; write one or pass a default caption")
        images.append(_load_image(f, size))
        captions.append(caption)
    prior, prior_caps = None, []
    if prior_folder is not None:
        p = folder_data(prior_folder, size, default_caption=None)
        prior, prior_caps = p.images, p.captions
    log.info("%s: %d images with captions%s", folder, len(images),
             f", {len(prior_caps)} prior images" if prior is not None else "")
    return ConceptData(np.stack(images), captions, prior, prior_caps, description=str(folder))


def resize_images(images: np.ndarray, side: int) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, side, side, 3) uint8 (bicubic)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in images])


# --- trigger words -----------------------------------------------------------------------------------------------


def caption_vocabulary_ids(tokenizer, n: int = 2000, seed: int = 0) -> set[int]:
    """Token ids the miniature world's captions use (base scenes, every style phrase, 'creature')."""
    from loraclr.world import scenes as S

    rng = np.random.default_rng([seed, 77])
    texts = [S.caption_scene(S.sample_base_scene(rng, styled=0.5))[0] for _ in range(n)]
    texts += [S.caption_scene(S.Scene((S.Character(S.sample_base_identity(rng), "middle"),), bg, st))[0]
              for bg in S.BACKGROUNDS for st in S.STYLES]
    ids: set[int] = set()
    for row in tokenizer(texts).input_ids:
        ids.update(row[1:-1])
    return ids


def pick_trigger(tokenizer, name: str, avoid: set[int], max_tokens: int = 2) -> str:
    """A rare trigger word for ``name``: at most ``max_tokens`` BPE tokens, none of them in ``avoid``.

    Candidates are spellings of the name (``rubo``, ``rubox``, ``zrubo`` ...), tried in a fixed order, so the
    choice is reproducible. ``avoid`` is updated with the chosen word's tokens, so that concepts picked one
    after another never share a token (shared sub-words would tie unrelated concepts together).
    """
    stem = "".join(c for c in name.lower() if c.isalnum()) or "sks"
    candidates = [stem, stem + "x", "z" + stem, stem + "q", stem[:3] + "x", "x" + stem, stem + "zz",
                  stem[::-1], stem[::-1] + "x"]
    for cand in candidates:
        ids = tokenizer(cand).input_ids[1:-1]
        if len(ids) <= max_tokens and not (set(ids) & avoid):
            avoid.update(ids)
            return cand
    raise ValueError(f"no rare trigger word found for {name!r} (tried {candidates}); pass one explicitly")


# --- the miniature world -------------------------------------------------------------------------------------------


def replace_phrase(caption: str, phrases: list[str], index: int, new: str) -> str:
    """Replace the ``index``-th character's words in ``caption`` (phrases appear left to right) by ``new``."""
    pos = 0
    for i, phrase in enumerate(phrases):
        at = caption.find(phrase, pos)
        if at < 0:
            raise ValueError(f"caption {caption!r} does not contain {phrase!r} after position {pos}")
        if i == index:
            return caption[:at] + new + caption[at + len(phrase):]
        pos = at + len(phrase)
    raise IndexError(f"character {index} of {len(phrases)} in {caption!r}")


def world_prior(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` base-pool scenes with their own captions (no held-out identity or style)."""
    from loraclr.world import scenes as S

    rng = np.random.default_rng([seed, 3])
    rendered = [S.render(S.sample_base_scene(rng), seed=int(rng.integers(2**31))) for _ in range(n)]
    return np.stack([r.image for r in rendered]), [r.caption for r in rendered]


def world_identity_data(name: str, phrase: str, n: int = 128, seed: int = 0, n_prior: int = 0) -> ConceptData:
    """Renders of the held-out identity ``name`` (see ``scenes.CONCEPTS``); its words become ``phrase``.

    ``phrase`` is what prompts will use for the concept, e.g. ``"a rubox creature"``.
    """
    from loraclr.world import scenes as S

    ident = S.concept(name)
    samples = S.identity_samples(ident, n, seed=seed)
    images = np.stack([r.image for r, _ in samples])
    captions = [replace_phrase(r.caption, r.character_phrases, i, phrase) for r, i in samples]
    prior, prior_caps = world_prior(n_prior, seed) if n_prior else (None, [])
    return ConceptData(images, captions, prior, prior_caps, description=f"world identity {name}")


def world_style_data(style: str, n: int = 128, seed: int = 0, n_prior: int = 0) -> ConceptData:
    """Base-pool scenes drawn in the held-out ``style``; their captions end with the style's words."""
    from loraclr.world import scenes as S

    if style not in S.STYLES or style == "none":
        raise ValueError(f"unknown style {style!r}; the world's styles are {[s for s in S.STYLES if s != 'none']}")
    rng = np.random.default_rng([seed, 5])
    rendered = []
    for _ in range(n):
        base = S.sample_base_scene(rng, styled=0.0)
        rendered.append(S.render(S.Scene(base.characters, base.background, style), seed=int(rng.integers(2**31))))
    prior, prior_caps = world_prior(n_prior, seed) if n_prior else (None, [])
    return ConceptData(np.stack([r.image for r in rendered]), [r.caption for r in rendered], prior, prior_caps,
                       description=f"world style {style}")


def style_trigger(style: str) -> str:
    """The words a style's captions carry (``"as a mosaic"`` -> ``"mosaic"``)."""
    from loraclr.world import scenes as S

    words = S.STYLE_PHRASE[style].split()
    return " ".join(w for w in words if w not in ("in", "as", "a", "style")) or style
