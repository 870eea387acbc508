"""Optional structure conditioning for generation: a ControlNet or a T2I-Adapter beside the base UNet.

A structure model is an ordinary local diffusers folder (``config.json`` + weights) holding a
``ControlNetModel`` or a ``T2IAdapter``; ``"layout"`` names the miniature world's layout adapter, which reads
:func:`layout_image` (one box per character) and lays characters out in their boxes, as the keypose
T2I-Adapter does for real SD in the LoRACLR paper's multi-concept figures.

Public API: :class:`Structure`, :func:`load_structure`, :func:`check_compatible`, :func:`structure_pipeline`,
:func:`structure_kwargs`, :func:`layout_image`, :data:`LAYOUT_DIR`.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from loraclr.world.model import ASSETS

log = logging.getLogger(__name__)

LAYOUT_DIR = ASSETS / "layout-adapter"
LAYOUT_NAME = "layout"  # load_structure's name for LAYOUT_DIR

# config.json's _class_name -> our kind
_KINDS = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i-adapter"}
# (kind, sdxl) -> (pipeline class name, name of the structure model's __init__ argument, scale kwarg)
_PIPELINES = {
    ("controlnet", False): ("StableDiffusionControlNetPipeline", "controlnet", "controlnet_conditioning_scale"),
    ("controlnet", True): ("StableDiffusionXLControlNetPipeline", "controlnet", "controlnet_conditioning_scale"),
    ("t2i-adapter", False): ("StableDiffusionAdapterPipeline", "adapter", "adapter_conditioning_scale"),
    ("t2i-adapter", True): ("StableDiffusionXLAdapterPipeline", "adapter", "adapter_conditioning_scale"),
}


@dataclass
class Structure:
    """A loaded structure model and how strongly it steers (its residuals are multiplied by ``scale``)."""

    kind: str  # "controlnet" or "t2i-adapter"
    model: torch.nn.Module  # diffusers ControlNetModel or T2IAdapter
    scale: float = 1.0
    source: str = ""  # the folder it came from


# --- loading ------------------------------------------------------------------------------------------------


def load_structure(path: str | Path, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Structure:
    """A ControlNet or T2I-Adapter from a local diffusers folder; ``"layout"`` is the world's layout adapter.

    The kind comes from ``config.json``'s ``_class_name``. Load it in the pipeline's dtype (the ControlNet
    pipelines feed it the UNet's latents as they are).
    """
    folder = LAYOUT_DIR if str(path) == LAYOUT_NAME else Path(path)
    if not folder.is_dir():
        hint = " (the built-in one ships with the package; run scripts/train_layout_adapter.py)" \
            if folder == LAYOUT_DIR else ""
        raise FileNotFoundError(f"structure folder {folder} does not exist{hint}; give a local diffusers "
                                "ControlNetModel or T2IAdapter folder, or 'layout'")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a structure folder is a diffusers ControlNetModel "
                                "or T2IAdapter saved with save_pretrained")
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a JSON object ({e})") from None
    if class_name not in _KINDS:
        raise ValueError(f"{folder}: config.json's _class_name is {class_name!r}; structure conditioning takes "
                         f"one of {sorted(_KINDS)}")
    if not math.isfinite(scale):
        raise ValueError(f"{folder}: structure scale {scale} is not finite")
    import diffusers

    cls = getattr(diffusers, class_name)
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"{folder}: cannot load the {class_name} weights ({e})") from None
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{folder}: non-finite weights in {len(bad)} tensors (first: {bad[0]}); the file is "
                         "corrupt or was saved after a diverged training run")
    model.eval().requires_grad_(False)
    return Structure(_KINDS[class_name], model, float(scale), str(folder))


# --- fitting it to a pipeline -------------------------------------------------------------------------------


def _is_sdxl(unet) -> bool:
    return unet.config.get("addition_embed_type") == "text_time"


def _family(sdxl: bool) -> str:
    return "SDXL" if sdxl else "SD 1.x/2.x"


def unet_adapter_slots(unet, latent_side: int) -> list[tuple[int, int]]:
    """(channels, side) of the tensor each UNet down block adds a T2I-Adapter feature to, in order.

    As ``UNet2DConditionModel.forward`` does it: a block with cross-attention adds it after its last layer
    (before its downsampler), a block without adds it after the whole block (after its downsampler).
    """
    slots, side = [], latent_side
    for block in unet.down_blocks:
        channels = block.resnets[-1].out_channels
        down = getattr(block, "downsamplers", None) is not None
        after = side // 2 if (down and not getattr(block, "has_cross_attention", False)) else side
        slots.append((channels, after))
        side = side // 2 if down else side
    return slots


def _adapter_features(adapter, side: int) -> list[tuple[int, int]]:
    """(channels, side) of each feature the adapter gives for a ``side`` x ``side`` condition image."""
    p = next(adapter.parameters())
    x = torch.zeros(1, adapter.config.in_channels, side, side, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        return [(f.shape[1], f.shape[-1]) for f in adapter(x)]


def check_compatible(pipe, structure: Structure) -> None:
    """Raise a ValueError naming the structure folder when its model cannot steer ``pipe``'s UNet."""
    unet, model, where = pipe.unet, structure.model, structure.source or type(structure.model).__name__
    sdxl = _is_sdxl(unet)
    p, q = next(model.parameters()), next(unet.parameters())
    # both kinds must match: a ControlNet reads the UNet's latents, an adapter's features join the UNet's
    # activations before its convolutions
    if p.device != q.device or p.dtype != q.dtype:
        raise ValueError(f"{where}: the {structure.kind} is {p.dtype} on {p.device} but the UNet is {q.dtype} on "
                         f"{q.device}; load it with load_structure(..., dtype={q.dtype}) and move it to {q.device}")
    if structure.kind == "controlnet":
        c, u = model.config, unet.config
        if (c.get("addition_embed_type") == "text_time") != sdxl:
            raise ValueError(f"{where}: a {_family(not sdxl)} ControlNet cannot steer a {_family(sdxl)} UNet")
        wanted = {k: u.get(k) for k in ("in_channels", "cross_attention_dim", "block_out_channels",
                                         "down_block_types", "layers_per_block")}
        got = {k: c.get(k) for k in wanted}
        diff = [f"{k} {_norm(got[k])} vs the UNet's {_norm(wanted[k])}" for k in wanted
                if _norm(got[k]) != _norm(wanted[k])]
        scale = 2 ** (len(c.get("conditioning_embedding_out_channels")) - 1)
        if scale != pipe.vae_scale_factor:
            diff.append(f"its condition embedding downsamples by {scale}, the VAE by {pipe.vae_scale_factor}")
        if diff:
            raise ValueError(f"{where}: ControlNet does not fit the pipeline's UNet: " + "; ".join(diff))
        return
    # a condition image whose side every downsampling on both paths divides
    n = len(unet.down_blocks)
    side = math.lcm(pipe.vae_scale_factor * 2 ** n, model.total_downscale_factor)
    slots = unet_adapter_slots(unet, side // pipe.vae_scale_factor)
    feats = _adapter_features(model, side)
    # the UNet takes one feature per down block (a surplus one goes to the mid block when shapes match)
    if len(feats) >= len(slots) and feats[:len(slots)] == slots:
        return
    adapter_type = model.config.get("adapter_type")
    if (adapter_type == "full_adapter_xl") != sdxl:
        raise ValueError(f"{where}: a T2I-Adapter of type {adapter_type!r} is for "
                         f"{_family(adapter_type == 'full_adapter_xl')}, the pipeline is {_family(sdxl)}")
    raise ValueError(f"{where}: T2I-Adapter features (channels, side) {feats} for a {side} px condition do not "
                     f"fit the UNet's down blocks {slots}; its channels must be the UNet's block_out_channels "
                     f"{list(unet.config.block_out_channels)} and its downscale_factor the VAE's "
                     f"{pipe.vae_scale_factor} times the blocks' own")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def structure_pipeline(pipe, structure: Structure):
    """A diffusers ControlNet / T2I-Adapter pipeline sharing ``pipe``'s modules (no copies) plus the model."""
    import diffusers

    check_compatible(pipe, structure)
    name, arg, _ = _PIPELINES[(structure.kind, _is_sdxl(pipe.unet))]
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in pipe.components.items() if k in params}
    kw[arg] = structure.model
    # no safety checker or watermarker: the base pipelines here run without them
    extras = {"safety_checker": None, "requires_safety_checker": False, "add_watermarker": False,
              "force_zeros_for_empty_prompt": pipe.config.get("force_zeros_for_empty_prompt", True)}
    kw.update({k: v for k, v in extras.items() if k in params})
    out = cls(**kw)
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
    return out


def structure_kwargs(structure: Structure, image: Image.Image, height: int, width: int) -> dict:
    """The structure pipeline's extra ``__call__`` kwargs: the condition image at (width, height) and scale."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"{structure.source}: the condition image must be a PIL image, got {type(image).__name__}")
    channels = structure.model.config.get("conditioning_channels" if structure.kind == "controlnet"
                                          else "in_channels", 3)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    scale_arg = _PIPELINES[(structure.kind, False)][2]
    return {"image": image, scale_arg: structure.scale}


# --- the world layout adapter's condition ---------------------------------------------------------------------

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width / height


def layout_image(boxes: Sequence[Box], height: int, width: int) -> Image.Image:
    """The layout adapter's condition: one box per character, each meaning "one character inside here".

    RGB on black. Red: every box filled (where characters may be). Green: each box's outline, drawn on top,
    so two boxes that touch or overlap stay two boxes. Blue: a disc at each box's centre, one per character,
    so the count survives any overlap.
    """
    if height < 8 or width < 8:
        raise ValueError(f"layout_image: {width}x{height} px is too small to draw boxes in")
    px = []
    for i, b in enumerate(boxes):
        if len(b) != 4 or not all(math.isfinite(float(v)) for v in b):
            raise ValueError(f"layout box {i} {tuple(b)} is not four finite numbers (x0, y0, x1, y1)")
        x0, y0, x1, y1 = (float(v) for v in b)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"layout box {i} {tuple(b)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                             "(fractions of the image)")
        px.append((x0 * width, y0 * height, x1 * width, y1 * height))
    line = max(1, round(min(height, width) / 32))  # 2 px at 64 px: visible after the adapter's 4x unshuffle
    radius = max(1.0, min(height, width) / 20)
    fill = Image.new("L", (width, height), 0)
    edge = Image.new("L", (width, height), 0)
    dots = Image.new("L", (width, height), 0)
    for x0, y0, x1, y1 in px:
        # PIL rectangles include their last pixel: a box ending at the image edge ends at pixel side - 1
        r = [round(x0), round(y0), round(x1) - 1, round(y1) - 1]
        ImageDraw.Draw(fill).rectangle(r, fill=255)
        ImageDraw.Draw(edge).rectangle(r, outline=255, width=line)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ImageDraw.Draw(dots).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    return Image.merge("RGB", (fill, edge, dots))
