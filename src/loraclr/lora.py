"""The canonical in-memory form of a LoRA file, whatever format it came from.

Every reader in :mod:`loraclr.io` produces a :class:`LoraSet`; every writer consumes one (or dense deltas).

Keys are the diffusers module paths of the component, prefixed by the component name::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj
    text_encoder_2.text_model.encoder.layers.31.mlp.fc1

Text-encoder keys always carry ``text_model.`` (as SD checkpoints and every LoRA format do), even though
transformers v5 dropped that prefix from live module names; :func:`split_key` and
:func:`loraclr.models.find_module` bridge the two.

Three kinds of tensors, never mixed up (STYLE.md "types that carry meaning"):
- a base weight ``W``  (out, in) or (out, in, kh, kw);
- a dense offset ``dW`` of the same shape (:class:`DenseDelta`, or :meth:`LoraLayer.delta`);
- LoRA factors ``(down=A, up=B, alpha)`` with ``dW = alpha / rank * B @ A``.
Averaging A's and B's separately is *not* averaging deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FAMILIES = ("sd1", "sd2", "sdxl", "unknown")


def split_key(key: str) -> tuple[str, str]:
    """``"unet.down_blocks.0..." -> ("unet", "down_blocks.0...")``; raises on an unknown component."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"layer key {key!r} does not start with one of {COMPONENTS}")
    return component, path


@dataclass(frozen=True)
class LoraLayer:
    """LoRA factors of one module: ``dW = (alpha / rank) * up @ down``.

    down (A): (r, in) for Linear, (r, in, kh, kw) for Conv2d.
    up (B):   (out, r) for Linear, (out, r, 1, 1) for Conv2d.
    alpha:    always a number; readers resolve a missing alpha to the rank (kohya's convention).
    """

    down: Tensor
    up: Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(
                f"LoRA factors disagree on the rank: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this LoRA modifies."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense offset dW, weight-shaped, computed in ``dtype``."""
        up = self.up.to(dtype).reshape(self.up.shape[0], self.rank)
        down = self.down.to(dtype).reshape(self.rank, -1)
        # scaled in place: the same values as scale * (up @ down) without a second (out, in) allocation
        return (up @ down).mul_(self.scale).reshape(self.weight_shape)


@dataclass(frozen=True)
class DenseDelta:
    """A dense weight offset dW (an exactly converted LyCORIS layer, or a merge result)."""

    weight: Tensor

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype)


Layer = LoraLayer | DenseDelta


@dataclass
class LearnedToken:
    """A token whose embedding was learned (textual inversion, ED-LoRA, pivotal tuning).

    embeddings: component ("text_encoder" / "text_encoder_2") -> (n_vectors, dim).
    layerwise: False for ordinary multi-vector tokens (the n rows are consecutive tokens in the prompt);
        True for ED-LoRA, where the n rows are per-UNet-cross-attention-layer variants of *one* token.
    """

    name: str
    embeddings: dict[str, Tensor]
    layerwise: bool = False


@dataclass
class LoraSet:
    """One LoRA file in canonical form.

    layers:   canonical key -> factors or dense delta.
    tokens:   learned tokens carried by the file (or by an embedding file beside it).
    metadata: the file's string metadata (safetensors header, kohya ``ss_*``, ``modelspec.*``).
    format:   the detected source format ("kohya", "diffusers", "diffusers-legacy", "edlora",
              "textual-inversion", ...).
    family:   base family detected from keys, shapes and metadata: one of :data:`FAMILIES`.
    source:   where it was read from (for error messages).
    """

    layers: dict[str, Layer] = field(default_factory=dict)
    tokens: list[LearnedToken] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "unknown"
    family: str = "unknown"
    source: str = ""

    def components(self) -> list[str]:
        return sorted({split_key(k)[0] for k in self.layers})

    def deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Dense dW per layer (weight-shaped)."""
        return {k: layer.delta(dtype) for k, layer in self.layers.items()}
