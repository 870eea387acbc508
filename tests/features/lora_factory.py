"""Random concept LoRAs for tests: non-zero factors on the default kohya targets of a tiny pipeline."""

from __future__ import annotations

import torch
from torch import nn

from loraclr.lora import LearnedToken, LoraLayer, LoraSet
from loraclr.models import default_lora_targets


def random_loraset(pipe, seed: int, rank: int = 4, alpha: float = 4.0, scale: float = 0.3,
                   tokens: list[LearnedToken] | None = None, family: str = "unknown", only=None) -> LoraSet:
    """A LoRA on every default target (``only``: a predicate on keys), with B != 0 so it changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for key, mod in default_lora_targets(pipe).items():
        if only is not None and not only(key):
            continue
        if isinstance(mod, nn.Conv2d):
            down = torch.randn(rank, mod.in_channels, *mod.kernel_size, generator=gen)
            up = torch.randn(mod.out_channels, rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, mod.in_features, generator=gen)
            up = torch.randn(mod.out_features, rank, generator=gen)
        # scale so that ||dW|| is a fixed fraction of ||W0||: large enough to matter, small enough to stay sane
        w = mod.weight.detach().float()
        d = (alpha / rank) * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))
        factor = scale * w.norm() / d.norm()
        layers[key] = LoraLayer(down=down * factor.sqrt(), up=up * factor.sqrt(), alpha=alpha)
    return LoraSet(layers=layers, tokens=list(tokens or []), format="test", family=family, source=f"random{seed}")


def random_token(pipe, name: str, seed: int, n_vectors: int = 1, layerwise: bool = False) -> LearnedToken:
    gen = torch.Generator().manual_seed(seed + 1000)
    emb = {}
    for comp in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, comp, None)
        if te is not None:
            width = te.get_input_embeddings().weight.shape[1]
            emb[comp] = torch.randn(n_vectors, width, generator=gen) * 0.02
    return LearnedToken(name=name, embeddings=emb, layerwise=layerwise)
