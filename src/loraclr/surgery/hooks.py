"""Forward hooks that change what a model computes while a ``with`` block runs: LoRA deltas added to layer
outputs, and per-layer cross-attention states (ED-LoRA layer-wise tokens). Generation, training, the merge's
feature runs and regional prompting all use these; feature *recording* lives in :mod:`loraclr.features`.

Every hook is installed by a context manager that removes it in ``finally``, also when the forward pass
raises. Nothing here changes a weight, so the model is exactly as it was after every ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraclr.lora import DenseDelta, Layer, LoraLayer
from loraclr.models import find_module

# --- applying LoRAs ----------------------------------------------------------------------------------------


def _lora_output(module: nn.Module, x: Tensor, layer: Layer, scale: float) -> Tensor:
    """scale * dW applied to the module's input x, computed from the factors when it has them."""
    if isinstance(module, nn.Conv2d):
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if isinstance(layer, LoraLayer):
            down = layer.down.to(x.dtype)
            if down.dim() == 2:  # a Linear-shaped LoRA on a 1x1 conv
                down = down[:, :, None, None]
            up = layer.up.to(x.dtype).reshape(layer.up.shape[0], layer.rank, 1, 1)
            return F.conv2d(F.conv2d(x, down, **conv), up) * (scale * layer.scale)
        return F.conv2d(x, layer.weight.to(x.dtype).reshape(module.weight.shape), **conv) * scale
    if isinstance(layer, LoraLayer):
        down = layer.down.to(x.dtype).reshape(layer.rank, -1)
        up = layer.up.to(x.dtype).reshape(layer.up.shape[0], layer.rank)
        return F.linear(F.linear(x, down), up) * (scale * layer.scale)
    return F.linear(x, layer.weight.to(x.dtype).reshape(module.weight.shape)) * scale


@contextlib.contextmanager
def apply_layers(
    model, layers: Mapping[str, Layer], strengths: Mapping[str, float] | None = None
) -> Iterator[None]:
    """Add ``strength * dW`` to the outputs of the named modules while inside the block.

    model: a pipeline or a dict of components (see :func:`loraclr.models.find_module`).
    layers: canonical key -> LoRA factors or dense delta.
    strengths: component -> multiplier ("unet", "text_encoder", ...); missing components use 1.0.
    Hooks instead of fused weights: exact restoration for free, and no copy of the touched weights.
    """
    strengths = strengths or {}
    handles = []
    try:
        for key, layer in layers.items():
            module = find_module(model, key)
            scale = float(strengths.get(key.split(".", 1)[0], 1.0))
            if scale == 0.0:
                continue

            def hook(mod, args, out, _layer=layer, _scale=scale):
                return out + _lora_output(mod, args[0], _layer, _scale)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def apply_offsets(model, offsets: Mapping[str, Tensor]) -> Iterator[None]:
    """Like :func:`apply_layers` for dense offsets D (weight-shaped or flattened)."""
    with apply_layers(model, {k: DenseDelta(v) for k, v in offsets.items()}):
        yield


# --- per-layer cross-attention states (ED-LoRA layer-wise tokens) ------------------------------------------


def cross_attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention modules in forward order (down, mid, up), as ED-LoRA numbers them."""
    found = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        root = getattr(unet, part, None)
        if root is None:
            continue
        for name, mod in root.named_modules():
            if name.endswith("attn2") and getattr(mod, "is_cross_attention", True):
                found.append((f"{part}.{name}", mod))
    return found


@contextlib.contextmanager
def layerwise_states(unet: nn.Module, states: Sequence[Tensor],
                     skip: Callable[[], bool] | None = None) -> Iterator[None]:
    """Feed cross-attention layer l the encoder states ``states[l]`` (B, L, D) instead of the shared ones.

    With classifier-free guidance the pipeline calls the UNet with ``cat([negative, positive])``; the hook
    keeps the first (negative) half and swaps in the layer's positive states for the second half.
    ``skip``: while it returns True the hook stands aside (UNet calls with other prompts, e.g. region passes).
    """
    layers = cross_attention_modules(unet)
    if len(states) != len(layers):
        raise ValueError(f"{len(states)} layer-wise states for {len(layers)} cross-attention layers")
    handles = []

    def make(l_idx: int):
        def pre_hook(module, args, kwargs):
            ehs = kwargs.get("encoder_hidden_states")
            if ehs is None or (skip is not None and skip()):
                return None
            pos = states[l_idx].to(ehs.dtype)
            if ehs.shape[0] == pos.shape[0]:
                new = pos
            elif ehs.shape[0] == 2 * pos.shape[0]:
                new = torch.cat([ehs[: pos.shape[0]], pos])
            else:
                raise ValueError(
                    f"layer-wise states of batch {pos.shape[0]} do not fit encoder states {tuple(ehs.shape)}"
                )
            kwargs = dict(kwargs, encoder_hidden_states=new)
            return args, kwargs

        return pre_hook

    try:
        for i, (_, mod) in enumerate(layers):
            handles.append(mod.register_forward_pre_hook(make(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def modules_for(model, keys) -> dict[str, nn.Module]:
    return {k: find_module(model, k) for k in keys}
