"""Loading base models and merged outputs, and generating images from them.

``generate`` draws from either
* a merged output folder written by ``loraclr merge`` (its ``pipeline/`` folder, prompt map and tokens), or
* a base model (diffusers folder, single-file checkpoint, ``mini``) plus LoRA files stacked naively
  (the sum of their deltas: the "before merging" reference).

ED-LoRA layer-wise tokens: a prompt that uses one is encoded once per UNet cross-attention layer (the
token's layer-l vocabulary entry in place of its name) and cross-attention layer l receives its own states
through a forward pre-hook (:func:`loraclr.surgery.hooks.layerwise_states`), as Mix-of-Show's EDLoRA
attention processor does. The pipeline itself receives the layer-0 states (which only matter for layers
that are not cross-attention; there are none in SD). Plain diffusers cannot do this: use ``generate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraclr.export import MANIFEST, PIPELINE, PROMPTS
from loraclr.regional import RegionalPlan
from loraclr.surgery.hooks import cross_attention_modules, layerwise_states
from loraclr.surgery.tokens import AddedToken, TokenTable, add_tokens, encode_prompts, is_sdxl, plan_tokens

log = logging.getLogger(__name__)


def resolve_base(path: str) -> Path:
    """``mini`` -> the built-in miniature model's folder; anything else must exist."""
    if path == "mini":
        try:
            from loraclr.world import base_model_path
        except ImportError as e:  # the miniature world is another part of the project
            raise FileNotFoundError(
                "the miniature world is not built yet (loraclr.world.base_model_path is missing); "
                "build it first or name a base model folder"
            ) from e
        return Path(base_model_path())
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: base model not found; give a diffusers folder, a checkpoint file or 'mini'")
    return p


def load_base(path: str, *, config: str | None = None, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a folder (``model_index.json``), a single-file checkpoint, or ``mini``."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    p = resolve_base(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"{p}: no model_index.json; not a diffusers pipeline folder")
        pipe = DiffusionPipeline.from_pretrained(str(p), dtype=dtype)
    else:
        kw: dict[str, Any] = {"dtype": dtype}
        if config:
            kw["config"] = str(config)
        errors = []
        pipe = None
        for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
            try:
                pipe = cls.from_single_file(str(p), **kw)
                break
            except Exception as e:  # diffusers raises many types here; report them all at once
                errors.append(f"{cls.__name__}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if pipe is None:
            raise ValueError(
                f"{p}: could not load the checkpoint ({'; '.join(errors)}); offline, pass a diffusers folder "
                "with the matching configs as base.config (CLI: --base-config)"
            )
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{p}: not a Stable Diffusion pipeline (needs unet and text_encoder)")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of(pipe) -> str:
    """sd1 / sd2 / sdxl from the components (not from sizes: tiny test models have their own widths)."""
    if is_sdxl(pipe):
        return "sdxl"
    te = pipe.text_encoder.config
    if getattr(te, "hidden_act", "") == "gelu" and getattr(pipe.unet.config, "use_linear_projection", False):
        return "sd2"  # OpenCLIP ViT-H text tower and linear projections
    return "sd1"


# --- merged outputs ---------------------------------------------------------------------------------------


@dataclass
class Model:
    """A loaded model ready to draw: the pipeline, its added tokens, and concept triggers (for prompts)."""

    pipe: Any
    table: TokenTable = field(default_factory=TokenTable)
    triggers: dict[str, str] = field(default_factory=dict)  # concept -> text to use in prompts

    def prompt(self, text: str) -> str:
        """Replace ``{concept}`` placeholders by the concept's trigger text, and learned tokens written as in
        their files (a recipe's ``<rubo1>``) by their names in this model."""
        for name, trig in self.triggers.items():
            text = text.replace("{" + name + "}", trig)
        return self.table.rewrite_originals(text)


def is_merged_output(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32) -> Model:
    """A merged output folder: its pipeline (tokens already in its tokenizer) and prompt map."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    pipe = load_base(str(path / manifest.get("pipeline", PIPELINE)), dtype=dtype)
    prompt_map = json.loads((path / manifest.get("prompts", PROMPTS)).read_text())
    tokens = [
        AddedToken(t["concept"], t["original"], t["name"], t["n_vectors"], t["layerwise"], {})
        for t in prompt_map.get("tokens", [])
    ]
    table = TokenTable(tokens, n_layers=len(cross_attention_modules(pipe.unet)))
    triggers = {name: c["trigger"] for name, c in prompt_map.get("concepts", {}).items()}
    return Model(pipe, table, triggers)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale); the scale is the part after the last ':' when it is a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def load_with_loras(base: str, loras: list[tuple[str, float]], *, allow_pickle: bool = False,
                    config: str | None = None, dtype: torch.dtype = torch.float32) -> Model:
    """Base model with LoRAs stacked naively: every delta is added (scale * dW) into the weights."""
    from loraclr.io.checkpoint import fuse_deltas

    model, layers = load_separate(base, loras, allow_pickle=allow_pickle, config=config, dtype=dtype)
    summed: dict[str, torch.Tensor] = {}
    for per_lora in layers:
        for key, layer in per_lora.items():
            d = layer.delta(torch.float32)
            summed[key] = summed[key] + d if key in summed else d
    fuse_deltas(model.pipe, summed)
    return model


def load_separate(base: str, loras: list[tuple[str, float]], *, allow_pickle: bool = False,
                  config: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Model, list[dict]]:
    """The base model with every LoRA's learned tokens added but no weight changed, and each LoRA's layers
    (canonical key -> layer, scaled): for applying one LoRA at a time (the per-region own-LoRA reference)."""
    from loraclr.io import load_lora

    for f, _ in loras:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: LoRA file not found")
    pipe = load_base(base, config=config, dtype=dtype)
    n_layers = len(cross_attention_modules(pipe.unet))
    tokens: list[AddedToken] = []
    layers: list[dict] = []
    for f, scale in loras:
        lora = load_lora(f, allow_pickle=allow_pickle, unet_config=dict(pipe.unet.config))
        layers.append({key: _scaled(layer, scale) for key, layer in lora.layers.items()})
        planned = plan_tokens(Path(f).stem, lora.tokens, n_layers, source=f)
        for t in planned:
            t.name = t.original if t.original.startswith("<") else f"<{t.original}>"
            if any(o.name == t.name for o in tokens):
                raise ValueError(f"{f}: token {t.original!r} is also in another LoRA; naive stacking cannot "
                                 "tell them apart (merge them with `loraclr merge` instead)")
        tokens.extend(planned)
    table = TokenTable(tokens, n_layers=n_layers)
    if tokens:
        add_tokens(pipe, table)
    return Model(pipe, table), layers


def _scaled(layer, scale: float):
    """``scale * dW`` as a layer of the same kind (a LoRA stays factored: the scale goes into its up factor)."""
    from loraclr.lora import DenseDelta, LoraLayer

    if scale == 1.0:
        return layer
    if isinstance(layer, LoraLayer):
        return dataclasses.replace(layer, up=layer.up * scale)
    return DenseDelta(layer.delta(torch.float32) * scale)


def load_model(model: str | Path, loras: list[tuple[str, float]] | None = None, **kw) -> Model:
    """A merged output folder (optionally with extra LoRAs on top) or a base model plus LoRAs."""
    if is_merged_output(model):
        m = load_merged(model, dtype=kw.get("dtype", torch.float32))
        if loras:
            from loraclr.io import load_lora
            from loraclr.io.checkpoint import fuse_deltas

            for f, scale in loras:
                lora = load_lora(f, allow_pickle=kw.get("allow_pickle", False))
                fuse_deltas(m.pipe, {k: v.delta() * scale for k, v in lora.layers.items()})
        return m
    return load_with_loras(str(model), list(loras or []), allow_pickle=kw.get("allow_pickle", False),
                           config=kw.get("config"), dtype=kw.get("dtype", torch.float32))


# --- generation ------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: str | Path | Model,
    prompts: list[str],
    *,
    loras: list[tuple[str, float]] | None = None,
    n: int = 1,
    seed: int = 0,
    negative: str = "",
    guidance: float = 7.5,
    steps: int = 25,
    size: tuple[int, int] | None = None,
    out_dir: str | Path | None = None,
    grid: str | Path | None = None,
    progress: bool = True,
    regions: RegionalPlan | None = None,
    region_layers: list[dict] | None = None,
    structure=None,
    structure_image=None,
) -> list:
    """Images (PIL) for every prompt, ``n`` each, seeds ``seed, seed+1, ...`` per prompt.

    model: a merged output folder, a base model (folder / checkpoint / ``mini``) or a loaded :class:`Model`.
    loras: ``[(file, scale)]`` stacked naively on the base (or on the merged model).
    prompts may use ``{concept}`` placeholders of a merged output (replaced by the concept's trigger).
    out_dir: also save ``{i:03d}-{j}.png`` there; grid: save a grid (rows = prompts, columns = seeds).
    regions: boxes with their own prompts, applied to every prompt (:mod:`loraclr.regional`); region_layers:
    per region, LoRA layers used only in that region's pass (noise mode: the per-region own-LoRA reference).
    structure: a :class:`loraclr.structure.Structure` (ControlNet / T2I-Adapter) with its condition image
    ``structure_image``; without an image and with regions, the image is drawn from the regions' boxes
    (:func:`loraclr.structure.layout_image`, what the built-in layout adapter reads).
    """
    from loraclr.regional import check_plan, check_prompt, encode_regions, regional_sampling

    m = model if isinstance(model, Model) else load_model(model, loras)
    pipe = m.pipe
    pipe.set_progress_bar_config(disable=not progress)
    if size is None:
        side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        size = (side, side)
    height, width = size
    most = int(pipe.scheduler.config.num_train_timesteps)  # the scheduler indexes its training timesteps
    if not 1 <= steps <= most:
        raise ValueError(f"steps: {steps} denoising steps asked; this model's scheduler takes 1 to {most}")
    if regions is not None:
        check_plan(m, regions, size, prompts)
    else:
        for j, raw in enumerate(prompts):
            check_prompt(m, raw, f"prompt {j + 1}")
    runner, extra = pipe, {}
    if structure is not None:
        from loraclr.structure import check_compatible, layout_image, structure_kwargs, structure_pipeline

        check_compatible(pipe, structure)
        if regions is not None and regions.mode == "area":
            raise ValueError("the area mode draws each region on a crop of the latents, which a structure "
                             "condition does not follow; use the attention or noise mode with --structure")
        if structure_image is None:
            if regions is None:
                raise ValueError("a structure condition needs a condition image (or regions to draw a layout from)")
            structure_image = layout_image([r.box for r in regions.regions], height, width)
        runner = structure_pipeline(pipe, structure)
        runner.set_progress_bar_config(disable=not progress)
        extra = structure_kwargs(structure, structure_image, height, width)
    encoded = encode_regions(m, regions.regions, region_layers, negative) if regions is not None else None
    images, rows = [], []
    for i, raw in enumerate(prompts):
        text = m.prompt(raw)
        states, pooled, per_layer = encode_prompts(m.pipe, m.table, [text])
        row = []
        for j in range(n):
            gen = torch.Generator().manual_seed(seed + j)
            kw: dict[str, Any] = dict(
                prompt_embeds=states, negative_prompt=negative, guidance_scale=guidance,
                num_inference_steps=steps, height=height, width=width, generator=gen, **extra,
            )
            if pooled is not None:
                kw["pooled_prompt_embeds"] = pooled
            with contextlib.ExitStack() as stack:
                if per_layer is not None and regions is None:  # with regions, regional_sampling feeds them
                    stack.enter_context(layerwise_states(pipe.unet, per_layer))
                if regions is not None:
                    stack.enter_context(regional_sampling(m, regions, encoded, size=size, steps=steps,
                                                          guidance=guidance, region_layers=region_layers,
                                                          global_layer_states=per_layer))
                image = runner(**kw).images[0]
            row.append(image)
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                image.save(Path(out_dir) / f"{i:03d}-{j}.png")
        images.extend(row)
        rows.append(row)
        log.info("prompt %d/%d done: %s", i + 1, len(prompts), text)
    if grid is not None:
        make_grid(rows).save(grid)
    return images


def make_grid(rows: list[list]):
    """One image: rows of equally sized PIL images."""
    from PIL import Image

    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (w * cols, h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            canvas.paste(im, (c * w, r * h))
    return canvas


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` or ``"S"`` -> (height, width)."""
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--size {text!r}: expected HxW, e.g. 512x512") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 8:
        raise ValueError(f"--size {text!r}: expected HxW with sides >= 8")
    return vals[0], vals[1]
