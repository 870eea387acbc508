"""Where each character of a multi-character image is: the slot defines the region, as in the prompt.

A prompt "{a} on the left and {b} on the right" asks for ``a`` in the left region and ``b`` in the right
one; the identity of each is scored in its own region. Regions are fractions of the image (x0, y0, x1, y1),
so they apply to any resolution. The vertical extent follows the miniature world's layouts (characters stand
on the ground; with more characters they are smaller), cropping away sky that holds no character.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width / height

# (number of characters, slot) -> region. A single character is searched in the whole image.
_REGIONS: dict[int, dict[str, Box]] = {
    1: {"middle": (0.0, 0.0, 1.0, 1.0), "left": (0.0, 0.0, 1.0, 1.0), "right": (0.0, 0.0, 1.0, 1.0)},
    2: {"left": (0.0, 0.25, 0.5, 1.0), "right": (0.5, 0.25, 1.0, 1.0)},
    3: {"left": (0.0, 0.375, 1 / 3, 1.0), "middle": (1 / 3, 0.375, 2 / 3, 1.0), "right": (2 / 3, 0.375, 1.0, 1.0)},
}
SLOT_ORDER = {1: ("middle",), 2: ("left", "right"), 3: ("left", "middle", "right")}


def region(n_characters: int, slot: str) -> Box:
    """The region of ``slot`` in an image that should show ``n_characters`` characters."""
    if n_characters not in _REGIONS or slot not in _REGIONS[n_characters]:
        raise ValueError(f"no region for slot {slot!r} with {n_characters} characters; "
                         f"slots: { {n: list(v) for n, v in _REGIONS.items()} }")
    return _REGIONS[n_characters][slot]


def slots_for(n_characters: int) -> tuple[str, ...]:
    """Slots of an n-character prompt, left to right."""
    if n_characters not in SLOT_ORDER:
        raise ValueError(f"prompts hold 1-3 characters, got {n_characters}")
    return SLOT_ORDER[n_characters]


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box and resize to ``size`` x ``size`` (bilinear, one affine sampling).

    images: (B, C, H, W); boxes: (B, 4) fractions (x0, y0, x1, y1), may reach outside [0, 1] (border pixels
    are repeated). Returns (B, C, size, size).
    """
    b = boxes.to(images.dtype)
    cx = (b[:, 0] + b[:, 2]) - 1.0  # centre in [-1, 1] coordinates
    cy = (b[:, 1] + b[:, 3]) - 1.0
    sx = b[:, 2] - b[:, 0]
    sy = b[:, 3] - b[:, 1]
    theta = torch.zeros(len(b), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta, [len(b), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_boxes(boxes: torch.Tensor, generator: torch.Generator, shift: float = 0.08,
                 scale: float = 0.12) -> torch.Tensor:
    """Random shifts (fraction of the box side) and scalings of boxes: characters in generated images are
    not exactly where the renderer puts them."""
    n = len(boxes)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + (torch.rand(n, generator=generator) * 2 - 1) * shift * w
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + (torch.rand(n, generator=generator) * 2 - 1) * shift * h
    s = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    return torch.stack([cx - w * s / 2, cy - h * s / 2, cx + w * s / 2, cy + h * s / 2], dim=1)
