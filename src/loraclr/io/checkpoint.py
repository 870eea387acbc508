"""Apply deltas to a base model and save it: a diffusers folder or an SD single-file checkpoint.

The single-file layout is the original (LDM/SGM) one that A1111, ComfyUI and diffusers' ``from_single_file``
read: ``model.diffusion_model.*`` (UNet, SGM names), ``first_stage_model.*`` (VAE), and
``cond_stage_model.transformer.*`` (SD 1.x) or ``conditioner.embedders.0.transformer.*`` +
``conditioner.embedders.1.model.*`` (SDXL, the second encoder in OpenCLIP layout with fused q/k/v). The
reverse maps use diffusers' own tables where it has them (VAE top level, OpenCLIP) and the config-derived
UNet map of :mod:`loraclr.io.keymap`; the tests run diffusers' converters on our output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from loraclr.io import keymap
from loraclr.io.safe import atomic_write, check_finite, check_output_path, unshare
from loraclr.models import find_module

log = logging.getLogger(__name__)


def _get(pipe: Any, name: str) -> Any:
    return pipe.get(name) if isinstance(pipe, dict) else getattr(pipe, name, None)


def fuse_deltas(pipe_or_components: Any, deltas: dict[str, Tensor], strict: bool = True) -> list[str]:
    """Add each dW to its module's weight in place (computed in fp32, stored in the weight's dtype).

    Every key and shape is checked before any weight changes, so an error leaves the model untouched.
    A (out, in) delta for a 1x1 conv (or the reverse) is reshaped; any other mismatch raises naming the key
    and both shapes. ``strict=False`` skips keys with no module (logged) instead of raising.
    Returns the keys that were fused.
    """
    plan: list[tuple[str, torch.nn.Parameter, Tensor]] = []
    for key, delta in deltas.items():
        try:
            module = find_module(pipe_or_components, key)
        except (KeyError, ValueError) as e:
            if strict:
                raise KeyError(f"{key}: no such module in the model ({e.args[0]}); the LoRA is for another "
                               "model, or pass strict=False to skip it") from e
            log.warning("skipping %s: no such module in the model", key)
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{key}: module {type(module).__name__} has no weight to add a delta to")
        if tuple(delta.shape) != tuple(weight.shape):
            if delta.numel() == weight.numel() and delta.shape[0] == weight.shape[0] and (
                delta.dim() == 2 or weight.dim() == 2 or tuple(weight.shape[2:]) == (1, 1)
            ):
                delta = delta.reshape(weight.shape)
            else:
                raise ValueError(f"{key}: shape mismatch, the delta is {tuple(delta.shape)} but the model's weight "
                                 f"is {tuple(weight.shape)}; the LoRA was made for a different model")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(f"{key}: the delta holds NaN or inf; refusing to corrupt the model")
        plan.append((key, weight, delta))
    with torch.no_grad():
        for _, weight, delta in plan:
            weight.copy_((weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype))
    return [k for k, _, _ in plan]


def save_pipeline(pipe: Any, out_dir: str | Path, inputs: list[str | Path] | None = None) -> Path:
    """``pipe.save_pretrained`` into a temporary folder beside ``out_dir``, renamed on success."""
    out_dir = check_output_path(out_dir, inputs)
    with atomic_write(out_dir) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return out_dir


# --- single-file layout ------------------------------------------------------------------------------------


def _unet_sd(unet: torch.nn.Module) -> dict[str, Tensor]:
    cfg = dict(unet.config)
    to_ldm, _ = keymap.ldm_maps(cfg)
    out = {}
    for name, t in unet.state_dict().items():
        mod, _, param = name.rpartition(".")
        if mod not in to_ldm:
            raise KeyError(f"unet.{name}: no single-file name for this parameter")
        out[f"model.diffusion_model.{to_ldm[mod]}.{param}"] = t
    return out


def _vae_ldm_name(name: str, n_up: int) -> str:
    """diffusers AutoencoderKL parameter name -> LDM name (inverse of diffusers' convert_ldm_vae_checkpoint)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if name in top:
        return top[name]
    p = name.split(".")
    side, rest = p[0], p[1:]
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1])
        block = f"down.{i}" if rest[0] == "down_blocks" else f"up.{n_up - 1 - i}"
        if rest[2] == "resnets":
            tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{block}.block.{rest[3]}.{tail}"
        kind = "downsample" if rest[2] == "downsamplers" else "upsample"
        return f"{side}.{block}.{kind}.{'.'.join(rest[5:] if rest[4] == 'conv' else rest[4:])}".replace(
            f"{kind}.", f"{kind}.conv.", 1)
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:]).replace('conv_shortcut', 'nin_shortcut')}"
        sub = ".".join(rest[3:])
        sub = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}.get(
            sub.rsplit(".", 1)[0], None), sub.rsplit(".", 1)[1]
        if sub[0] is None:
            raise KeyError(f"vae.{name}: no single-file name")
        return f"{side}.mid.attn_1.{sub[0]}.{sub[1]}"
    raise KeyError(f"vae.{name}: no single-file name")


def _vae_sd(vae: torch.nn.Module) -> dict[str, Tensor]:
    n_up = len(vae.config.up_block_types)
    out = {}
    for name, t in vae.state_dict().items():
        ldm = _vae_ldm_name(name, n_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # LDM's VAE attention uses 1x1 convs
        out["first_stage_model." + ldm] = t
    return out


def _clip_sd(te: torch.nn.Module, prefix: str) -> dict[str, Tensor]:
    out = {}
    for name, t in te.state_dict().items():
        if not name.startswith("text_model.") and not name.startswith("text_projection"):
            name = "text_model." + name
        out[prefix + name] = t
    return out


def _open_clip_sd(te: torch.nn.Module, prefix: str) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP layout (q/k/v fused into in_proj, text_projection transposed)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    m = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
          for k, v in te.state_dict().items()}
    out: dict[str, Tensor] = {}
    for dk, lk in m["layers"].items():
        if dk in sd:
            out[prefix + lk] = sd.pop(dk).T.contiguous() if lk == "text_projection" else sd.pop(dk)
    n = te.config.num_hidden_layers
    for i in range(n):
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(src + f"self_attn.{x}_proj.{kind}")
                                                           for x in ("q", "k", "v")])
            out[dst + f"attn.out_proj.{kind}"] = sd.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = sd.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = sd.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = sd.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = sd.pop(src + f"mlp.fc2.{kind}")
    sd.pop("text_model.embeddings.position_ids", None)
    if sd:
        raise KeyError(f"text_encoder_2: parameters without an OpenCLIP name: {sorted(sd)[:5]}")
    return out


def single_file_state_dict(pipe: Any) -> dict[str, Tensor]:
    """The SD single-file (LDM/SGM) state dict of a pipeline's UNet, VAE and text encoder(s)."""
    out = _unet_sd(_get(pipe, "unet"))
    vae = _get(pipe, "vae")
    if vae is not None:
        out.update(_vae_sd(vae))
    te2 = _get(pipe, "text_encoder_2")
    if te2 is None:
        out.update(_clip_sd(_get(pipe, "text_encoder"), "cond_stage_model.transformer."))
    else:
        out.update(_clip_sd(_get(pipe, "text_encoder"), "conditioner.embedders.0.transformer."))
        out.update(_open_clip_sd(te2, "conditioner.embedders.1.model."))
    return out


def save_single_file(pipe: Any, path: str | Path, inputs: list[str | Path] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline as one SD checkpoint ``.safetensors`` (atomic; NaN/inf refused before writing)."""
    path = check_output_path(path, inputs)
    sd = single_file_state_dict(pipe)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    check_finite(sd, str(path))
    with atomic_write(path) as tmp:
        save_file(unshare(sd), str(tmp), metadata={"format": "pt"})
    return path
