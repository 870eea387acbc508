"""What the suites need from evaluators: two small interfaces and a bundle of them.

Images everywhere are float tensors (B, 3, H, W) in [0, 1]; boxes are (B, 4) fractions (x0, y0, x1, y1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class TextImageModel(Protocol):
    """A CLIP-like model: unit embeddings of images and texts in one space."""

    name: str

    def embed_images(self, images: Tensor) -> Tensor: ...  # (B, 3, H, W) -> (B, D)

    def embed_texts(self, texts: list[str]) -> Tensor: ...  # -> (B, D)


class IdentityModel(Protocol):
    """An identity embedder ("ArcFace"): unit embeddings of the character / face inside each box, and the
    distance threshold under which two embeddings are the same identity. ``embed_regions`` may return NaN
    rows where it finds no face in the box (counted as not recognised)."""

    name: str
    threshold: float

    def embed_regions(self, images: Tensor, boxes: Tensor) -> Tensor: ...  # -> (B, D)


@dataclass
class Evaluators:
    text_image: TextImageModel
    identity: IdentityModel | None = None
    info: dict = field(default_factory=dict)  # calibration and provenance, written into results


FULL = (0.0, 0.0, 1.0, 1.0)


def to_tensor(images) -> Tensor:
    """PIL images, uint8 / float arrays (H, W, 3) or a (B, 3, H, W) tensor -> float (B, 3, H, W) in [0, 1]."""
    if isinstance(images, Tensor):
        x = images.float()
        return x / 255.0 if x.max() > 1.5 else x
    arrs = []
    for im in images:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected RGB images (H, W, 3), got shape {a.shape}")
        arrs.append(torch.from_numpy(np.array(a, copy=True)).float() / (255.0 if a.dtype == np.uint8 else 1.0))
    if len({tuple(a.shape) for a in arrs}) > 1:
        raise ValueError(f"images of different sizes: {sorted({tuple(a.shape) for a in arrs})}")
    return torch.stack(arrs).permute(0, 3, 1, 2).contiguous()


def batched(fn, x, size: int = 64) -> Tensor:
    """Apply ``fn`` over chunks of ``x`` (a tensor or a list) under no_grad and concatenate."""
    with torch.no_grad():
        return torch.cat([fn(x[i: i + size]) for i in range(0, len(x), size)])
