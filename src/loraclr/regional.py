"""Regional composition: several characters in one image, each in its own box with its own prompt.

A global prompt describes the whole scene ("{a} on the left and {b} on the right at the beach"); each
:class:`Region` gives a box (fractions of the image) and the prompt that should hold inside it ("{a} at the
beach"). Three mechanisms, chosen by name in :data:`MODES`:

* ``attention`` — Mix-of-Show's regionally controllable sampling (Gu et al., NeurIPS 2023, §3.3), as LoRACLR
  (Simsar et al., CVPR 2025, §4) composes its multi-concept images: inside every UNet cross-attention layer
  the queries of a box attend to the box's prompt instead of the global one; where boxes overlap their outputs
  are averaged; uncovered positions keep the global prompt. The unconditional half of classifier-free guidance
  attends to the region's negative prompt (the global negative when the region has none). One UNet call per
  step, as plain sampling.
* ``noise`` — "latent couple": the UNet predicts the noise once per region prompt over the whole image and
  the predictions are blended by the boxes' masks at latent resolution.
* ``area`` — ComfyUI's area conditioning: as ``noise``, but each region's prediction is made on the box's crop
  of the latents alone, so the model composes that prompt to fill the box (a character per box) instead of
  the whole image.

In ``noise`` and ``area`` modes each region's prediction may come from its own weights (``region_layers``: a
LoRA applied only in that region's pass), which is how the per-region own-LoRA reference of the evaluation is
drawn. 1 + R UNet passes per step.

All can leave the first steps to the global prompt alone (``start``, a fraction of the steps), so that the
global prompt lays out the scene before regions bind each character to its place (as OMG does with its first
stage).

Outputs blend linearly with weights that sum to one inside the boxes, so blending after the attention's
output projection equals blending before it: the wrapper calls the model's own attention processor (SD1, SD2,
SDXL, any backend) and needs no copy of its maths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width / height
MODES = ("attention", "noise", "area")
DEFAULT_MODE = "attention"  # see docs/regions.md for the measurements behind the defaults
DEFAULT_START = 0.4  # the global prompt lays out the scene first (docs/regions.md)
MAX_REGIONS = 16  # every region costs a batch entry per cross-attention call (attention) or per step (noise)
MIN_COVERAGE = 0.5  # a box must cover at least half of one cell of every grid it acts on


# --- what to draw ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A box (fractions of the image, x0 < x1, y0 < y1) and the prompt that holds inside it."""

    box: Box
    prompt: str
    negative: str | None = None  # None: the global negative prompt


@dataclass(frozen=True)
class RegionalPlan:
    """Regions and how to apply them. ``start``: fraction of the steps drawn with the global prompt alone."""

    regions: tuple[Region, ...]
    mode: str = DEFAULT_MODE
    start: float = DEFAULT_START

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown region mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"region start {self.start} must be a fraction of the steps in [0, 1)")
        object.__setattr__(self, "regions", tuple(self.regions))


def parse_region(text: str) -> Region:
    """``"x0,y0,x1,y1:prompt"`` (fractions of the image) -> :class:`Region`; the prompt may hold ':'."""
    head, sep, prompt = text.partition(":")
    if not sep or not prompt.strip():
        raise ValueError(f"--region {text!r}: expected 'x0,y0,x1,y1:prompt', e.g. '0,0.25,0.5,1:{{rubo}} at the beach'")
    try:
        box = tuple(float(v) for v in head.split(","))
    except ValueError:
        raise ValueError(f"--region {text!r}: the box {head!r} must be four numbers x0,y0,x1,y1") from None
    if len(box) != 4:
        raise ValueError(f"--region {text!r}: the box {head!r} must be four numbers x0,y0,x1,y1")
    return Region(box, prompt.strip())  # type: ignore[arg-type]


def load_regions(path: str | Path) -> dict[str, Any]:
    """A regions file (YAML or JSON)::

        prompt: "{rubo} on the left and {rika} on the right at the beach"   # optional: the global prompt
        negative: ""                                                        # optional
        mode: attention                                                     # optional
        start: 0.4                                                          # optional
        regions:
          - {box: [0, 0.25, 0.5, 1], prompt: "{rubo} at the beach"}
          - {box: [0.5, 0.25, 1, 1], prompt: "{rika} at the beach", negative: "a hat"}

    Returns ``{"regions": [Region, ...]}`` plus whichever of prompt / negative / mode / start the file sets.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: regions file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    if isinstance(data, list):
        data = {"regions": data}
    if not isinstance(data, dict) or not isinstance(data.get("regions"), list):
        raise ValueError(f"{path}: expected a mapping with a 'regions' list (see `loraclr generate --help`)")
    unknown = set(data) - {"prompt", "negative", "mode", "start", "regions"}
    if unknown:
        raise ValueError(f"{path}: unknown fields {sorted(unknown)}; allowed: prompt, negative, mode, start, regions")
    out: dict[str, Any] = {k: data[k] for k in ("prompt", "negative", "mode", "start") if k in data}
    regions = []
    for i, r in enumerate(data["regions"]):
        where = f"{path}: regions[{i}]"
        if not isinstance(r, dict) or "box" not in r or "prompt" not in r:
            raise ValueError(f"{where}: each region needs 'box' [x0, y0, x1, y1] and 'prompt'")
        extra = set(r) - {"box", "prompt", "negative"}
        if extra:
            raise ValueError(f"{where}: unknown fields {sorted(extra)}; allowed: box, prompt, negative")
        box = r["box"]
        if not isinstance(box, list | tuple) or len(box) != 4 or not all(isinstance(v, int | float) for v in box):
            raise ValueError(f"{where}: 'box' must be four numbers [x0, y0, x1, y1], got {box!r}")
        regions.append(Region(tuple(float(v) for v in box), str(r["prompt"]),  # type: ignore[arg-type]
                              None if r.get("negative") is None else str(r["negative"])))
    out["regions"] = regions
    return out


# --- masks (pure) ----------------------------------------------------------------------------------------


def coverage(box: Box, h: int, w: int) -> Tensor:
    """(h, w): the fraction of each cell of an h x w grid over the image that ``box`` covers."""
    x0, y0, x1, y1 = box

    def overlap(lo: float, hi: float, n: int) -> Tensor:
        edges = torch.arange(n + 1, dtype=torch.float32) / n
        return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo)))
                .clamp(min=0) * n)

    return overlap(y0, y1, h)[:, None] * overlap(x0, x1, w)[None, :]


def blend_weights(boxes: Sequence[Box], h: int, w: int) -> tuple[Tensor, Tensor]:
    """Per-region weights (R, h*w) and the global prompt's weight (h*w,) on an h x w grid.

    A cell covered by boxes whose coverages sum to c keeps ``1 - min(c, 1)`` of the global prompt and splits the
    rest among the boxes in proportion to their coverage: a fully covered cell is all region (overlaps averaged,
    as Mix-of-Show does), a cell on a box's edge is partly both. Weights sum to one everywhere.
    """
    cov = torch.stack([coverage(b, h, w).reshape(-1) for b in boxes])  # (R, h*w)
    total = cov.sum(0)
    regional = cov / total.clamp(min=1.0)
    return regional, 1.0 - regional.sum(0)


def cell_window(box: Box, h: int, w: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): the cells of an h x w grid that ``box`` touches."""
    x0, y0, x1, y1 = box
    r0, c0 = min(int(math.floor(y0 * h + 1e-6)), h - 1), min(int(math.floor(x0 * w + 1e-6)), w - 1)
    return r0, max(int(math.ceil(y1 * h - 1e-6)), r0 + 1), c0, max(int(math.ceil(x1 * w - 1e-6)), c0 + 1)


def attention_grids(unet: nn.Module, latent_hw: tuple[int, int]) -> list[tuple[str, int, int]]:
    """(name, h, w) of every cross-attention layer's query grid for latents of ``latent_hw``, in forward order.

    Each down block that has a downsampler halves the grid (rounding up, as a padded stride-2 conv does).
    """
    from loraclr.surgery.hooks import cross_attention_modules

    h, w = latent_hw
    sizes: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        sizes[f"down_blocks.{i}."] = (h, w)
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    sizes["mid_block."] = (h, w)
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        sizes[f"up_blocks.{i}."] = (h, w)
        if getattr(block, "upsamplers", None):
            h, w = h * 2, w * 2
    out = []
    for name, _ in cross_attention_modules(unet):
        prefix = next(p for p in sizes if name.startswith(p))
        out.append((name, *sizes[prefix]))
    return out


def check_boxes(regions: Sequence[Region], grids: Sequence[tuple[str, int, int]], size: tuple[int, int]) -> None:
    """One clear error for a box outside [0, 1], an empty one, or one too small for a grid it acts on."""
    if not regions:
        raise ValueError("no regions given")
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"{len(regions)} regions; at most {MAX_REGIONS} (each costs one more prompt per step)")
    height, width = size
    for i, r in enumerate(regions, 1):
        x0, y0, x1, y1 = r.box
        if not all(math.isfinite(v) for v in r.box) or min(r.box) < 0 or max(r.box) > 1:
            raise ValueError(f"region {i} box {r.box}: coordinates are fractions of the image, in [0, 1]")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"region {i} box {r.box}: empty; write it as x0,y0,x1,y1 with x0 < x1 and y0 < y1")
        for name, h, w in sorted(grids, key=lambda g: g[1] * g[2]):  # coarsest first: it needs the largest box
            if coverage(r.box, h, w).max() < MIN_COVERAGE:
                raise ValueError(
                    f"region {i} box {r.box}: too small for {name}, whose grid is {h}x{w} cells at {height}x{width} "
                    f"px; a box must cover at least half of one cell there: about {1 / w:.3g} of the width "
                    f"({math.ceil(width / w)} px) and {1 / h:.3g} of the height ({math.ceil(height / h)} px)")


# --- the state shared by the hooks -----------------------------------------------------------------------


@dataclass
class _Encoded:
    """Encoder states of one region: positive (1, L, D), negative (1, L, D) or None, per layer or shared."""

    positive: list[Tensor]  # one entry, or one per cross-attention layer (ED-LoRA layer-wise tokens)
    negative: list[Tensor] | None
    pooled: Tensor | None = None  # SDXL pooled text embedding of the positive prompt
    negative_pooled: Tensor | None = None

    def at(self, layer: int | None, which: str) -> Tensor | None:
        states = self.positive if which == "positive" else self.negative
        if states is None:
            return None
        return states[0] if len(states) == 1 or layer is None else states[layer]


@dataclass
class _State:
    plan: RegionalPlan
    encoded: list[_Encoded]
    latent_hw: tuple[int, int]
    steps: int
    cfg: bool  # classifier-free guidance: the UNet's batch is [unconditional, conditional]
    step: int = -1
    inside: bool = False  # a region pass of the noise mode is running: hooks stand aside
    pass_states: Callable[[int | None], Tensor] | None = None  # that pass's encoder states, per layer
    unconsumed: dict[str, list] = field(default_factory=dict)  # the global call's list arguments, as passed
    weights: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.step >= round(self.plan.start * self.steps)

    def grid_of(self, n_positions: int) -> tuple[int, int]:
        h, w = self.latent_hw
        for _ in range(8):
            if h * w == n_positions:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        raise ValueError(f"cannot place {n_positions} attention positions on a grid of the {self.latent_hw} latents")

    def blend(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        if (h, w) not in self.weights:
            self.weights[(h, w)] = blend_weights([r.box for r in self.plan.regions], h, w)
        return self.weights[(h, w)]


def _states_for(enc: _Encoded, layer: int | None, ehs: Tensor, cfg: bool) -> Tensor:
    """A region's encoder states shaped like the global ``ehs`` (B, L, D): [negative, positive] halves under
    classifier-free guidance (the global negative where the region has none), positive alone without it."""
    pos = enc.at(layer, "positive").to(ehs.dtype)
    if not cfg:
        return pos.expand(ehs.shape[0], -1, -1)
    half = ehs.shape[0] // 2
    neg = enc.at(layer, "negative")
    neg = ehs[:half] if neg is None else neg.to(ehs.dtype).expand(half, -1, -1)
    return torch.cat([neg, pos.expand(half, -1, -1)])


# --- mechanism (a): attention-level ----------------------------------------------------------------------


class RegionalAttnProcessor:
    """Wraps a cross-attention layer's processor: the global output outside the boxes, each box's own prompt
    inside (see the module doc). The wrapped processor does all the attention maths."""

    def __init__(self, inner, state: _State, layer: int):
        self.inner, self.state, self.layer = inner, state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        st = self.state
        if encoder_hidden_states is None or hidden_states.dim() != 3 or st.inside or not st.active:
            return out
        b, n_pos, _ = hidden_states.shape
        regional, keep = st.blend(*st.grid_of(n_pos))  # (R, n_pos), (n_pos,)
        regional, keep = regional.to(out.dtype), keep.to(out.dtype)
        r = len(st.encoded)
        states = torch.cat([_states_for(e, self.layer, encoder_hidden_states, st.cfg) for e in st.encoded])  # (R*B, L, D)
        mask = None if attention_mask is None else attention_mask.repeat(r, *([1] * (attention_mask.dim() - 1)))
        region_out = self.inner(attn, hidden_states.repeat(r, 1, 1), states, mask, temb, *args, **kwargs)
        region_out = region_out.reshape(r, b, n_pos, -1)
        return out * keep[None, :, None] + torch.einsum("rp,rbpc->bpc", regional, region_out)


@contextlib.contextmanager
def _attention_mode(unet: nn.Module, state: _State) -> Iterator[None]:
    from loraclr.surgery.hooks import cross_attention_modules

    originals = []
    try:
        for i, (_, mod) in enumerate(cross_attention_modules(unet)):
            originals.append((mod, mod.processor))
            mod.set_processor(RegionalAttnProcessor(mod.processor, state, i))
        yield
    finally:
        for mod, proc in originals:
            mod.set_processor(proc)


# --- mechanism (b): noise-level --------------------------------------------------------------------------


def _take(obj: Any, batch: int, index: Tensor, reps: int = 1) -> Any:
    """``obj`` (a tensor, or tuples / lists / dicts of them) with its batch dimension indexed by ``index`` and
    repeated ``reps`` times; anything without that batch dimension (a scalar timestep) unchanged."""
    if isinstance(obj, Tensor):
        if obj.dim() == 0 or obj.shape[0] != batch:
            return obj
        sel = obj[index]
        return sel.repeat(reps, *([1] * (sel.dim() - 1))) if reps > 1 else sel
    if isinstance(obj, tuple | list):
        return type(obj)(_take(o, batch, index, reps) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, batch, index, reps) for k, v in obj.items()}
    return obj


_UNET_ARGS = ("sample", "timestep", "encoder_hidden_states")


@contextlib.contextmanager
def _noise_mode(unet: nn.Module, state: _State,
                region_context: Callable[[int], contextlib.AbstractContextManager] | None) -> Iterator[None]:
    from loraclr.surgery.hooks import cross_attention_modules

    def hook(module, args, kwargs, output):
        if state.inside or not state.active:
            return None
        call = dict(zip(_UNET_ARGS, args, strict=False)) | kwargs | state.unconsumed
        sample, ehs = call["sample"], call["encoder_hidden_states"]
        eps = output[0] if isinstance(output, tuple) else output.sample
        b = sample.shape[0]
        r = len(state.encoded)
        # the unconditional half needs its own pass where a region has its own negative prompt, its own weights
        # (the per-region LoRA reference guides against its own unconditional prediction) or its own crop (a
        # crop's prediction differs from the whole image's; guidance would amplify that difference)
        own_negative = (any(e.negative is not None for e in state.encoded) or region_context is not None
                        or state.plan.mode == "area")
        index = torch.arange(b // 2, b) if state.cfg and not own_negative else torch.arange(b)
        rest = {k: v for k, v in call.items() if k != "encoder_hidden_states"}

        def run(group: list[_Encoded], window: tuple[int, int, int, int] | None = None) -> Tensor:
            kw = _with_pooled(_take(rest, b, index, len(group)), call, group, index, state.cfg)
            if window is not None:  # area mode: the UNet sees the box's part of the latents only
                r0, r1, c0, c1 = window
                kw["sample"] = kw["sample"][..., r0:r1, c0:c1]
            state.pass_states = lambda layer: torch.cat([_states_for(e, layer, ehs, state.cfg)[index] for e in group])
            res = module(encoder_hidden_states=state.pass_states(None), **kw)
            out = res[0] if isinstance(res, tuple) else res.sample
            if window is None:
                return out
            full = torch.zeros(out.shape[0], *eps.shape[1:], dtype=out.dtype, device=out.device)
            full[..., r0:r1, c0:c1] = out  # outside its window a region has no weight (blend_weights)
            return full

        state.inside = True
        try:
            h, w = eps.shape[-2:]
            if state.plan.mode == "area":
                preds = []
                for i, e in enumerate(state.encoded):
                    with region_context(i) if region_context is not None else contextlib.nullcontext():
                        preds.append(run([e], cell_window(state.plan.regions[i].box, h, w)))
            elif region_context is None:  # every region with the same weights: one batched pass
                preds = list(run(state.encoded).reshape(r, len(index), *eps.shape[1:]))
            else:
                preds = []
                for i, e in enumerate(state.encoded):
                    with region_context(i):
                        preds.append(run([e]))
        finally:
            state.inside, state.pass_states = False, None
        regional, keep = state.blend(h, w)
        regional = regional.reshape(r, 1, 1, h, w).to(eps.dtype)
        blended = eps[index] * keep.reshape(1, 1, h, w).to(eps.dtype) + (regional * torch.stack(preds)).sum(0)
        new = eps.clone()
        new[index] = blended
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    def layer_hook(layer: int):
        # ED-LoRA layer-wise tokens: each cross-attention layer of a region pass reads the region's states of
        # that layer (the global prompt's layer-wise hook stands aside during region passes)
        def pre_hook(module, args, kwargs):
            if not state.inside or state.pass_states is None or kwargs.get("encoder_hidden_states") is None:
                return None
            return args, dict(kwargs, encoder_hidden_states=state.pass_states(layer))

        return pre_hook

    def keep_lists(module, args, kwargs):
        # the UNet pops T2I-Adapter residuals off their list as it uses them: keep the full lists for the
        # region passes that follow the global one
        if not state.inside:
            state.unconsumed = {k: list(v) for k, v in kwargs.items() if isinstance(v, list)}

    handles = [unet.register_forward_pre_hook(keep_lists, with_kwargs=True),
               unet.register_forward_hook(hook, with_kwargs=True)]
    try:
        if any(len(e.positive) > 1 or (e.negative is not None and len(e.negative) > 1) for e in state.encoded):
            for i, (_, mod) in enumerate(cross_attention_modules(unet)):
                handles.append(mod.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _with_pooled(kw: dict, call: dict, encoded: Sequence[_Encoded], index: Tensor, cfg: bool) -> dict:
    """SDXL: each region pass gets its own prompt's pooled embedding in the added conditioning (region-major
    rows, as the batched states); unconditional rows keep the global negative's unless the region has one."""
    added = kw.get("added_cond_kwargs")
    if not added or "text_embeds" not in added or encoded[0].pooled is None:
        return kw
    glob = call["added_cond_kwargs"]["text_embeds"]  # (B, P) of the global call
    half = glob.shape[0] // 2
    rows = []
    for e in encoded:
        for j in index.tolist():
            if cfg and j < half:
                rows.append(glob[j] if e.negative_pooled is None else e.negative_pooled[0].to(glob.dtype))
            else:
                rows.append(e.pooled[0].to(glob.dtype))
    return dict(kw, added_cond_kwargs=dict(added, text_embeds=torch.stack(rows)))


# --- entry point ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _step_counter(unet: nn.Module, state: _State) -> Iterator[None]:
    """Counts denoising steps: the pipelines call the UNet once per step (both guidance halves batched)."""

    def pre_hook(module, args):
        if not state.inside:
            state.step += 1

    handle = unet.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def encode_regions(model, regions: Sequence[Region], region_layers: Sequence[Mapping] | None = None,
                   negative: str = "") -> list[_Encoded]:
    """Encoder states of every region's prompt and negative prompt (expanded per layer for layer-wise tokens),
    each under its own LoRA's text-encoder weights when ``region_layers`` gives them (then a region without a
    negative prompt gets the global ``negative`` encoded under those weights, as that LoRA alone would)."""
    from loraclr.surgery.hooks import apply_layers
    from loraclr.surgery.tokens import encode_prompts

    pipe, table = model.pipe, model.table
    out = []
    for i, r in enumerate(regions):
        layers = region_layers[i] if region_layers is not None else None
        ctx = apply_layers(pipe, {k: v for k, v in layers.items() if not k.startswith("unet.")}) \
            if layers else contextlib.nullcontext()
        with ctx:
            def states(text: str) -> tuple[list[Tensor], Tensor | None]:
                shared, pooled, per_layer = encode_prompts(pipe, table, [text])
                return (per_layer or [shared]), pooled

            pos, pooled = states(model.prompt(r.prompt))
            neg_text = r.negative if r.negative is not None else (negative if layers else None)
            neg, neg_pooled = states(model.prompt(neg_text)) if neg_text is not None else (None, None)
        out.append(_Encoded(pos, neg, pooled, neg_pooled))
    return out


@contextlib.contextmanager
def regional_sampling(model, plan: RegionalPlan, encoded: list[_Encoded], *, size: tuple[int, int],
                      steps: int, guidance: float, region_layers: Sequence[Mapping] | None = None,
                      global_layer_states: Sequence[Tensor] | None = None) -> Iterator[None]:
    """While inside, the model's pipeline draws with ``plan``'s regions (one image call; see the module doc).

    encoded: :func:`encode_regions` of the plan's regions (once per prompt, reused across seeds).
    region_layers: per region, LoRA layers (canonical key -> layer) active only in that region's pass
    (``noise`` mode only; their text-encoder part must already be in ``encoded``).
    global_layer_states: the global prompt's states per cross-attention layer when it uses layer-wise tokens
    (fed by :func:`loraclr.surgery.hooks.layerwise_states`, which stands aside in region passes).
    """
    from loraclr.surgery.hooks import apply_layers, layerwise_states

    pipe = model.pipe
    height, width = size
    latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    state = _State(plan, encoded, latent_hw, steps, cfg=guidance > 1.0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_step_counter(pipe.unet, state))
        if global_layer_states is not None:  # registered before the region passes' own layer hooks
            stack.enter_context(layerwise_states(pipe.unet, global_layer_states, skip=lambda: state.inside))
        if plan.mode == "attention":
            if region_layers is not None:
                raise ValueError("per-region LoRAs need the noise or area mode (one UNet pass per region)")
            stack.enter_context(_attention_mode(pipe.unet, state))
        else:
            ctx = None
            if region_layers is not None:
                unet_layers = [{k: v for k, v in layers.items() if k.startswith("unet.")} for layers in region_layers]

                def ctx(i: int):
                    return apply_layers(pipe, unet_layers[i])

            stack.enter_context(_noise_mode(pipe.unet, state, ctx))
        yield


def check_plan(model, plan: RegionalPlan, size: tuple[int, int], prompts: Sequence[str] = ()) -> None:
    """Every error a regional call can hit, before any sampling: boxes, grids, prompts and tokens."""
    pipe = model.pipe
    latent_hw = (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    grids = attention_grids(pipe.unet, latent_hw) if plan.mode == "attention" else [("the latents", *latent_hw)]
    check_boxes(plan.regions, grids, size)
    texts = [(f"prompt {j + 1}", p) for j, p in enumerate(prompts)]
    for i, r in enumerate(plan.regions, 1):
        texts.append((f"region {i} prompt", r.prompt))
        if r.negative is not None:
            texts.append((f"region {i} negative prompt", r.negative))
    for where, text in texts:
        check_prompt(model, text, where, full_length=where.startswith("region"))


_PLACEHOLDER = re.compile(r"\{([^{}\s]+)\}")
_TOKEN = re.compile(r"<[^<>\s]+>")


def check_prompt(model, text: str, where: str = "prompt", *, full_length: bool = False) -> None:
    """An unknown ``{concept}`` placeholder or ``<token>`` is an error (it would draw something else without a
    word); with ``full_length`` so is a prompt longer than the text encoder reads (a region prompt cut short
    loses what makes its region)."""
    from loraclr.surgery.tokens import text_components

    for name in _PLACEHOLDER.findall(text):
        if name not in model.triggers:
            known = ", ".join("{" + k + "}" for k in model.triggers) or "none (not a merged output)"
            raise ValueError(f"{where} {text!r}: unknown concept {{{name}}}; known: {known}")
    filled = model.prompt(text)
    expanded = model.table.expand(filled)
    comps = text_components(model.pipe)
    tokenizer = comps[0][1]
    for tok in _TOKEN.findall(expanded):
        # one lookup per token, not a copy of the whole vocabulary per prompt (this runs before every image)
        if tok != tokenizer.unk_token and tokenizer.convert_tokens_to_ids(tok) == tokenizer.unk_token_id:
            known = ", ".join(t.name for t in model.table.tokens) or "none"
            raise ValueError(f"{where} {text!r}: unknown token {tok!r}; learned tokens of this model: {known}")
    for _, tokenizer, _ in comps if full_length else ():
        n, limit = len(tokenizer(expanded, truncation=False).input_ids), tokenizer.model_max_length
        if n > limit:
            raise ValueError(f"{where} {text!r}: {n} tokens, the text encoder reads {limit}; shorten it by {n - limit}")
