"""Builders for LoRA test files: random factors for real module keys, written in each format by hand."""

from __future__ import annotations

import torch

from loraclr.lora import LoraLayer
from loraclr.models import default_lora_targets


def random_layers(components, keys=None, rank=2, alpha=None, seed=0, dtype=torch.float32,
                  every: int = 1) -> dict[str, LoraLayer]:
    """Non-zero LoRA factors shaped for the given (real or meta) components' modules (every n-th module)."""
    g = torch.Generator().manual_seed(seed)
    targets = default_lora_targets(components, include_convs=True)
    out = {}
    for i, (key, mod) in enumerate(sorted(targets.items())):
        if (keys is not None and key not in keys) or i % every:
            continue
        w = mod.weight
        r = rank + (i % 2)  # mixed ranks on purpose
        down_shape = (r, *w.shape[1:])
        up_shape = (w.shape[0], r, *([1, 1] if w.dim() == 4 else []))
        a = float(alpha if alpha is not None else (i % 3) + 0.5)
        out[key] = LoraLayer(torch.randn(down_shape, generator=g).to(dtype) * 0.1,
                             torch.randn(up_shape, generator=g).to(dtype) * 0.1, a)
    return out
