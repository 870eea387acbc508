"""Writing trained concept LoRAs: kohya / diffusers safetensors (through :mod:`loraclr.io`) and ED-LoRA ``.pth``.

ED-LoRA files follow Mix-of-Show's layout (``TencentARC/Mix-of-Show``, ``trainer_edlora.delta_state_dict``)::

    {"params": {"new_concept_embedding": {"<rubo1>": (n_cross_attn_layers, dim), ...},
                "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": (r, in), ...},
                "unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight": (out, r)}}}

Mix-of-Show saves no alpha: its layers add ``up @ down`` (scale 1, the strength is chosen when fusing), so the
trained ``alpha / rank`` is folded into ``up``. Only plain tensors and dicts are saved, so the file loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from loraclr.io.safe import atomic_write, check_finite, check_output_path
from loraclr.lora import LearnedToken, LoraLayer, split_key

log = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers", "edlora")


def save_edlora(layers: dict[str, LoraLayer], tokens: list[LearnedToken], path: str | Path,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write a Mix-of-Show ED-LoRA ``.pth`` (see the module docstring); atomic, checked for finiteness."""
    path = Path(path)
    check_output_path(path)
    params: dict[str, dict] = {"new_concept_embedding": {}, "text_encoder": {}, "unet": {}}
    for tok in tokens:
        if set(tok.embeddings) != {"text_encoder"}:
            raise ValueError(f"{path}: token {tok.name}: ED-LoRA files hold text_encoder embeddings only "
                             f"(got {sorted(tok.embeddings)})")
        params["new_concept_embedding"][tok.name] = tok.embeddings["text_encoder"].detach().cpu().to(dtype).contiguous()
    for key, layer in layers.items():
        comp, sub = split_key(key)
        if comp not in ("unet", "text_encoder"):
            raise ValueError(f"{path}: {key}: ED-LoRA files are SD 1.x only (unet and text_encoder)")
        if comp == "text_encoder" and not sub.startswith("text_model."):
            sub = "text_model." + sub
        up = (layer.up.detach().cpu().float() * layer.scale).to(dtype).contiguous()  # alpha / rank folded in
        params[comp][f"{sub}.lora_down.weight"] = layer.down.detach().cpu().to(dtype).contiguous()
        params[comp][f"{sub}.lora_up.weight"] = up
    flat = {f"{c}.{k}": v for c, d in params.items() for k, v in d.items()}
    check_finite(flat, str(path))
    with atomic_write(path) as tmp:
        torch.save({"params": params}, tmp)
    log.info("wrote %s: ED-LoRA, %d layers, tokens %s", path, len(layers), [t.name for t in tokens])
    return path


def check_save_path(path: str | Path, format: str) -> Path:
    """Refuse an output ``save_trained`` would refuse: unknown format, an ED-LoRA not named ``*.pth``, a folder
    that is missing or not writable. Cheap: callers run it before training, so a bad path costs no run."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"{path}: unknown format {format!r}; use one of {FORMATS}")
    if format == "edlora" and path.suffix != ".pth":
        raise ValueError(f"{path}: ED-LoRA files are torch pickles; name it *.pth")
    return check_output_path(path)


def snapshot_path(path: str | Path, steps: int) -> Path:
    """Where a snapshot of the run saved at ``path`` goes after ``steps`` steps: ``STEM-s<steps>.SUFFIX`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}-s{steps}{path.suffix}")


def save_trained(result, path: str | Path, *, format: str = "kohya", family: str = "sd1",
                 trigger: str | None = None, dtype: torch.dtype = torch.float16,
                 metadata: dict[str, str] | None = None, strength: float = 1.0) -> Path:
    """Save a :class:`~loraclr.training.trainer.TrainResult` as ``format`` (kohya / diffusers / edlora).

    ``strength`` scales every layer's alpha (the delta, not the learned tokens), i.e. the file at weight 1 acts
    like the trained LoRA at weight ``strength``: a recommended weight baked into the file. Recorded in the
    metadata as ``loraclr.strength`` (kohya / diffusers).

    kohya and diffusers files are written in ``dtype`` (fp16, as community files are) with kohya-style
    training metadata (``ss_*``, ``modelspec.trigger_phrase``); learned tokens, if any, go to an embedding file
    beside the LoRA. ED-LoRA files are always fp32, as Mix-of-Show writes them.
    """
    from loraclr.io import save_lora

    path = check_save_path(path, format)
    if not (strength > 0 and math.isfinite(strength)):
        raise ValueError(f"{path}: strength must be a positive finite number, got {strength!r}")
    if format == "edlora":
        layers = {k: LoraLayer(v.down, v.up, v.alpha * strength) for k, v in result.layers.items()}
        return save_edlora(layers, result.tokens, path)
    cfg = result.config
    meta = {
        "ss_training_comment": "trained by loraclr train-lora (DreamBooth-LoRA style)",
        "ss_steps": str(len(result.losses)), "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": str(cfg.lr), "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(cfg.text_lr if cfg.train_text_encoder else 0),
        "ss_seed": str(cfg.seed), "ss_num_train_images": str(result.n_images),
        "ss_num_reg_images": str(result.n_prior), "ss_prior_loss_weight": str(cfg.prior_weight),
        "ss_network_module": "networks.lora", "ss_batch_size_per_device": str(cfg.batch),
        "ss_mixed_precision": "bf16" if cfg.autocast else "no",
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "loraclr.training": json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, default=list),
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
        meta["ss_tag_frequency"] = json.dumps({"concept": {trigger: result.n_images}})
    if strength != 1.0:
        meta["loraclr.strength"] = repr(float(strength))
    meta.update(metadata or {})
    # files are written from CPU tensors, wherever the result was trained
    layers = {k: LoraLayer(v.down.detach().cpu().to(dtype), v.up.detach().cpu().to(dtype), v.alpha * strength)
              for k, v in result.layers.items()}
    tokens = [LearnedToken(t.name, {c: e.detach().cpu() for c, e in t.embeddings.items()}, layerwise=t.layerwise)
              for t in result.tokens]
    save_lora(layers, path, format=format, family=family, tokens=tokens or None, metadata=meta)
    return path
