"""Feature collection in the paper's order (:mod:`loraclr.merging`): text encoder, cross-attention k/v, spatial
layers.

Each stage returns per-layer inputs X_i (rows, subsampled to a cap) for every concept; the targets
Y_i = X_i (W0 + dW_i)^T are implied (closed form), so no layer output is ever stored. The caller turns a
:class:`StageFeatures` into :class:`loraclr.merge.api.LayerProblem`s one layer at a time
(:meth:`StageFeatures.problems`), so dense deltas and (spilled) rows exist for one layer at a time.

``keys`` (each collector): the stage's layers; default every layer of the stage that any of ``concepts`` has a
LoRA on. A worker that collects one concept (:mod:`loraclr.executors`) passes the whole merge's keys, so it
records the same layers as a collection over all concepts at once (also those where only other concepts have
LoRAs) and keeps the same rows: a layer's subsample is seeded by the layer (the first of siblings fed one
tensor, among the recorded keys), never by the concept. :func:`concept_features` / :func:`features_from` carry
one concept's rows to another process.

Subsampling tolerance: the rows kept are a uniform deterministic sample of each call (every position and
timestep is equally likely), so Gram statistics are unbiased up to a scale; ``features.max_rows`` bounds
memory at ``max_rows * d_in`` floats per layer and concept (see tests/features for the measured effect on a
least-squares merge). ``features.gram`` additionally keeps exact fp32 X^T X over all rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from loraclr.features.hooks import InputCapture
from loraclr.io.safe import owner_tag
from loraclr.lora import DenseDelta, Layer, LoraLayer, split_key
from loraclr.merge.api import LayerProblem, LowRankDeltas
from loraclr.models import find_module
from loraclr.recipe import FeatureSettings
from loraclr.runtime import PRECISION_NAMES, choose_precision
from loraclr.surgery.hooks import apply_layers, cross_attention_modules, layerwise_states
from loraclr.surgery.tokens import TokenTable, encode, is_sdxl, text_components, token_ids, trigger_positions

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ConceptFeaturesInput:
    """A concept as feature collection sees it (tokens already renamed).

    layers: its LoRA layers by canonical key; strengths: component -> strength (dW_i includes it).
    prompts: feature prompts with the trigger substituted and base token names (not yet expanded per layer).
    trigger: the text whose token positions feed the cross-attention k/v features (renamed base names).
    """

    name: str
    layers: dict[str, Layer]
    strengths: dict[str, float]
    prompts: list[str]
    trigger: str

    def delta(self, key: str, shape: tuple[int, ...]) -> Tensor:
        """strength * dW for one layer, flattened to (out, in); zeros when the concept has no LoRA there."""
        layer = self.layers.get(key)
        if layer is None:
            return torch.zeros(shape[0], math.prod(shape[1:]))
        strength = float(self.strengths.get(split_key(key)[0], 1.0))
        d = layer.delta(torch.float32)
        if strength != 1.0:  # x * 1.0 == x exactly, so skipping the pass changes no value
            # in place on the fresh LoRA product; a DenseDelta's delta may be the stored tensor itself
            d = d * strength if isinstance(layer, DenseDelta) else d.mul_(strength)
        return d.reshape(shape[0], -1)


    def factors(self, key: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, float] | None:
        """(up (out, r), down (r, in), scale) with :meth:`delta` = scale * up @ down, flattened like the
        weight; rank 0 when the concept has no LoRA there; None for a dense layer (no factors)."""
        layer = self.layers.get(key)
        if layer is None:
            return torch.zeros(shape[0], 0), torch.zeros(0, math.prod(shape[1:])), 1.0
        if not isinstance(layer, LoraLayer):
            return None
        strength = float(self.strengths.get(split_key(key)[0], 1.0))
        return (layer.up.float().reshape(layer.up.shape[0], layer.rank), layer.down.float().reshape(layer.rank, -1),
                layer.scale * strength)


def concept_deltas(concepts: list[ConceptFeaturesInput], key: str, shape: tuple[int, ...]) -> list[Tensor] | LowRankDeltas:
    """Every concept's delta at one layer: LoRA factors (:class:`LowRankDeltas`, built dense only on access)
    when every concept has them, so methods can use the low rank (a sum of twelve rank-16 deltas is one
    rank-192 product; the converged LoRACLR solve runs its factored closed form); else dense deltas."""
    factors = [c.factors(key, shape) for c in concepts]
    if factors and all(f is not None for f in factors):
        return LowRankDeltas(*(list(x) for x in zip(*factors, strict=True)))
    return [c.delta(key, shape) for c in concepts]


class FeatureStore:
    """Rows (and optional Gram statistics) per concept and layer; in memory or spilled to disk."""

    def __init__(self, n_concepts: int, spill_dir: str | Path | None = None):
        self.n = n_concepts
        self.mem: list[dict[str, Tensor]] = [{} for _ in range(n_concepts)]
        self.files: list[Path | None] = [None] * n_concepts
        self.spill_dir = Path(spill_dir) if spill_dir else None

    def put(self, i: int, tensors: dict[str, Tensor]) -> None:
        if self.spill_dir is None:
            self.mem[i].update(tensors)
            return
        from safetensors.torch import save_file

        path = self.spill_dir / f"concept{i}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        self.files[i] = path

    def get(self, i: int, key: str) -> Tensor | None:
        if self.files[i] is None:
            return self.mem[i].get(key)
        from safetensors import safe_open

        with safe_open(str(self.files[i]), framework="pt") as f:
            return f.get_tensor(key) if key in f.keys() else None


@dataclass
class StageFeatures:
    """The features of one stage: layer keys, base weights' shapes and per-concept rows."""

    stage: str
    keys: list[str]
    concepts: list[ConceptFeaturesInput]
    store: FeatureStore
    weights: dict[str, Tensor] = field(default_factory=dict)  # key -> W0 at collection, (out, in) fp32
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> the module's weight shape
    versions: dict[str, int] = field(default_factory=dict)  # key -> the live weight's version at collection

    def problems(self) -> Iterator[LayerProblem]:
        """One problem per layer. W0 is a view of the live fp32 weight (no copy: an SDXL UNet's targeted
        weights are ~7 GB), so the weights must not change between collection and solve; a change (an
        in-place update bumps the tensor's version counter) raises instead of solving against new weights."""
        for key in self.keys:
            W0 = self.weights[key]  # (out, in)
            if key in self.versions and W0._version != self.versions[key]:
                raise RuntimeError(
                    f"layer {key}: its weight changed after the {self.stage} features were collected; solve a "
                    "stage's problems before fusing anything into the model"
                )
            shape = self.shapes[key]
            X, grams, n_rows = [], [], []
            for i in range(len(self.concepts)):
                X.append(self.store.get(i, key))
                g = self.store.get(i, key + "#gram")
                grams.append(g)
                n = self.store.get(i, key + "#n")
                n_rows.append(int(n.item()) if n is not None else int(X[-1].shape[0]))
            yield LayerProblem(
                key=key,
                W0=W0,
                deltas=concept_deltas(self.concepts, key, shape),
                X=X,
                gram=grams if all(g is not None for g in grams) else None,
                n_rows=n_rows,
                concept_names=[c.name for c in self.concepts],
            )


def _snapshot_weights(model, keys: list[str]) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]], dict[str, int]]:
    """W0 (out, in) per key, bias excluded: a view of the live weight when it is fp32 (features run through
    hooks, so the weights do not change during collection), a fp32 copy otherwise; with the version counters
    that :meth:`StageFeatures.problems` checks."""
    weights, shapes, versions = {}, {}, {}
    for k in keys:
        w = find_module(model, k).weight.detach()
        shapes[k] = tuple(w.shape)
        weights[k] = w.float().reshape(w.shape[0], -1)
        versions[k] = weights[k]._version
    return weights, shapes, versions


def _store_capture(store: FeatureStore, i: int, cap: InputCapture, keys: list[str]) -> None:
    # Aliased keys (q/k/v fed one tensor) point at one tensor: stored once in memory; safetensors needs
    # distinct storage per key, so only the spilled file gets copies (disk, not RAM).
    out: dict[str, Tensor] = {}
    for k in keys:
        out[k] = cap.rows(k)
        gram, n = cap.stats(k)
        if gram is not None:
            out[k + "#gram"] = gram
        out[k + "#n"] = torch.tensor([n])
    if store.spill_dir is not None:
        out = {k: v.clone() if cap.alias.get(k, k) != k else v for k, v in out.items()}
    store.put(i, out)


# --- stage 2: text encoder ---------------------------------------------------------------------------------


@torch.no_grad()
def collect_text_encoder(
    pipe, concepts: list[ConceptFeaturesInput], table: TokenTable, settings: FeatureSettings,
    progress: Progress | None = None, keys: list[str] | None = None,
) -> StageFeatures:
    """X_i of every text-encoder layer any LoRA touches, from concept i's prompts with its LoRA applied.

    Every token of every prompt (layer-wise tokens: every per-layer variant of the prompt); with
    ``text_encoder_rows="padded"`` (default) the padding positions too, as the UNet sees them at inference;
    ``"prompt"`` keeps the official unpadded tokens only. See :class:`loraclr.recipe.FeatureSettings`.
    """
    if keys is None:
        keys = sorted({k for c in concepts for k in c.layers if split_key(k)[0].startswith("text_encoder")})
    weights, shapes, versions = _snapshot_weights(pipe, keys)
    store = FeatureStore(len(concepts))
    modules = {k: find_module(pipe, k) for k in keys}
    for i, c in enumerate(concepts):
        texts = [v for p in c.prompts for v in table.variants(p)]
        te_layers = {k: v for k, v in c.layers.items() if split_key(k)[0].startswith("text_encoder")}
        with apply_layers(pipe, te_layers, c.strengths), InputCapture(
            modules, cap=settings.max_rows, expected_calls=len(texts), seed=settings.seed, gram=settings.gram
        ) as cap:
            for t in texts:
                encode(pipe, [t], pad=settings.text_encoder_rows == "padded")
        _store_capture(store, i, cap, keys)
        if progress:
            progress("text encoder", i + 1, len(concepts))
    return StageFeatures("text_encoder", keys, concepts, store, weights, shapes, versions)


# --- stage 3: cross-attention k / v ------------------------------------------------------------------------


def cross_attention_keys(pipe, keys) -> list[str]:
    """UNet keys whose module reads the encoder states: to_k / to_v of the cross-attention modules."""
    cross = {f"unet.{name}" for name, _ in cross_attention_modules(pipe.unet)}
    return sorted(k for k in keys if k.rsplit(".", 1)[0] in cross and k.rsplit(".", 1)[1] in ("to_k", "to_v"))


@torch.no_grad()
def collect_cross_attention(
    pipe, concepts: list[ConceptFeaturesInput], table: TokenTable, settings: FeatureSettings,
    progress: Progress | None = None, keys: list[str] | None = None,
) -> StageFeatures:
    """X_i for cross-attention to_k / to_v: the (already merged) text encoder's states over the concept's
    prompts: at the trigger-token positions plus end-of-text (``cross_attention_rows="trigger"``, official),
    every unpadded token ("prompt") or every position the UNet attends to ("padded", default). Layer-wise
    tokens: layer l gets the states of the prompts bound to its own token variant. No hooks: the rows are
    the encoder states themselves."""
    if keys is None:
        keys = cross_attention_keys(pipe, {k for c in concepts for k in c.layers if k.startswith("unet.")})
    weights, shapes, versions = _snapshot_weights(pipe, keys)
    store = FeatureStore(len(concepts))
    layer_names = [f"unet.{n}" for n, _ in cross_attention_modules(pipe.unet)]
    tokenizer = text_components(pipe)[0][1]
    for i, c in enumerate(concepts):
        per_layer: dict[int | None, list[Tensor]] = {}
        layerwise = any(table.uses_layerwise(p) for p in c.prompts)
        for p in c.prompts:
            for layer in range(table.n_layers) if layerwise else [None]:
                text, trig = table.expand(p, layer), table.expand(c.trigger, layer)
                pos = trigger_positions(tokenizer, text, trig, where=f"concept {c.name!r}")
                if settings.cross_attention_rows == "trigger":
                    states, _ = encode(pipe, [text], pad=False)  # (1, L, D)
                    rows_i = states[0, pos]
                elif settings.cross_attention_rows == "prompt":
                    states, _ = encode(pipe, [text], pad=False)
                    rows_i = states[0]  # every unpadded token
                else:  # "padded": every position the UNet attends to at inference, padding included
                    states, _ = encode(pipe, [text], pad=True)
                    rows_i = states[0]
                per_layer.setdefault(layer, []).append(rows_i.float())
        rows = {layer: torch.cat(chunks) for layer, chunks in per_layer.items()}  # (n, D)
        out = {}
        for k in keys:
            layer = layer_names.index(k.rsplit(".", 1)[0]) if layerwise else None
            X = rows[layer]
            if settings.max_rows and X.shape[0] > settings.max_rows:
                gen = torch.Generator().manual_seed(settings.seed)
                X = X[torch.randperm(X.shape[0], generator=gen)[: settings.max_rows].sort().values]
            out[k] = X
            out[k + "#n"] = torch.tensor([rows[layer].shape[0]])
            if settings.gram:
                out[k + "#gram"] = rows[layer].T @ rows[layer]
        store.put(i, out)
        if progress:
            progress("cross-attention", i + 1, len(concepts))
    return StageFeatures("cross_attention", keys, concepts, store, weights, shapes, versions)


# --- stage 4: every other UNet layer -----------------------------------------------------------------------


def native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def spatial_resolution(pipe, settings: FeatureSettings) -> int:
    """Image side of the spatial feature run: ``resolution`` if given, else the native size capped at
    ``max_resolution``, rounded down to what the UNet can take (a multiple of the VAE factor x its
    downsampling, so the cap works for any model)."""
    if settings.resolution:
        return settings.resolution
    side = native_resolution(pipe)
    if settings.max_resolution is None or side <= settings.max_resolution:
        return side
    step = int(getattr(pipe, "vae_scale_factor", 8)) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return max(step, settings.max_resolution // step * step)


@contextlib.contextmanager
def _autocast(precision: str, device: torch.device):
    """Autocast for the feature run in ``precision``; "auto": bf16 where ``device`` computes it natively, else
    fp32 (:func:`loraclr.runtime.choose_precision`), so each machine of a distributed merge decides for itself."""
    if precision == "auto":
        precision = PRECISION_NAMES[choose_precision("auto", device)]
    if precision == "float32":
        yield
        return
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    with torch.autocast(device.type, dtype=dtype):
        yield


def conditioning(pipe, table: TokenTable, prompts: list[str], height: int, width: int):
    """UNet conditioning for prompts written with base token names (padded, as at inference).

    Returns (states (B, L, D), per-layer states list or None, added_cond_kwargs or None).
    """
    layerwise = any(table.uses_layerwise(p) for p in prompts)
    states, pooled = encode(pipe, [table.expand(p) for p in prompts], pad=True)
    per_layer = None
    if layerwise:
        per_layer = [encode(pipe, [table.expand(p, layer) for p in prompts], pad=True)[0]
                     for layer in range(table.n_layers)]
    added = None
    if is_sdxl(pipe) and getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=states.dtype, device=states.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(states.shape[0], 1)}
    return states, per_layer, added


@torch.no_grad()
def sample_latents(pipe, states: Tensor, added: dict | None, *, steps: int, height: int, width: int,
                   seed: int, precision: str = "float32", per_layer: list[Tensor] | None = None) -> Tensor:
    """A short DPM-Solver sampling run without guidance (the official feature run); returns the latents."""
    from diffusers import DPMSolverMultistepScheduler

    unet = pipe.unet
    device = next(unet.parameters()).device
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    sf = int(getattr(pipe, "vae_scale_factor", 8))
    gen = torch.Generator().manual_seed(seed)
    shape = (states.shape[0], unet.config.in_channels, height // sf, width // sf)
    latents = torch.randn(shape, generator=gen).to(device) * scheduler.init_noise_sigma
    ctx = layerwise_states(unet, per_layer) if per_layer is not None else contextlib.nullcontext()
    with ctx, _autocast(precision, device):
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(latents, t)
            eps = unet(inp, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
            latents = scheduler.step(eps.float(), t, latents).prev_sample
    return latents


def spatial_keys(pipe, concepts: list[ConceptFeaturesInput]) -> list[str]:
    all_keys = {k for c in concepts for k in c.layers if k.startswith("unet.")}
    return sorted(all_keys - set(cross_attention_keys(pipe, all_keys)))


@torch.no_grad()
def collect_spatial(
    pipe, concepts: list[ConceptFeaturesInput], table: TokenTable, settings: FeatureSettings,
    progress: Progress | None = None, spill_dir: str | Path | None = None, keys: list[str] | None = None,
) -> StageFeatures:
    """X_i of every other UNet layer with a LoRA, from a short sampling run per concept with its UNet LoRA.

    The text encoder is the merged one (as in the official code); every step is recorded.
    """
    if keys is None:
        keys = spatial_keys(pipe, concepts)
    weights, shapes, versions = _snapshot_weights(pipe, keys)
    store = FeatureStore(len(concepts), spill_dir)
    modules: dict[str, nn.Module] = {k: find_module(pipe, k) for k in keys}
    side = spatial_resolution(pipe, settings)
    for i, c in enumerate(concepts):
        prompts = c.prompts[: settings.spatial_prompts]
        states, per_layer, added = conditioning(pipe, table, prompts, side, side)
        unet_layers = {k: v for k, v in c.layers.items() if k.startswith("unet.")}
        with apply_layers(pipe, unet_layers, c.strengths), InputCapture(
            modules, cap=settings.max_rows, expected_calls=settings.steps, seed=settings.seed, gram=settings.gram
        ) as cap:
            sample_latents(pipe, states, added, steps=settings.steps, height=side, width=side,
                           seed=settings.seed, precision=settings.precision, per_layer=per_layer)
        _store_capture(store, i, cap, keys)
        del cap
        if progress:
            progress("spatial", i + 1, len(concepts))
    return StageFeatures("spatial", keys, concepts, store, weights, shapes, versions)


SPILL_PREFIX = "loraclr-features-"


@contextlib.contextmanager
def spill_directory(parent: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder for spilled features, removed afterwards (its name carries :func:`owner_tag`, so one
    left by a killed run can be swept later)."""
    d = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX + owner_tag(), dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def layer_shapes(model, keys) -> dict[str, tuple[int, ...]]:
    return {k: tuple(find_module(model, k).weight.shape) for k in keys}


def concept_features(feats: StageFeatures, i: int, key: str) -> dict[str, Tensor]:
    """Concept ``i``'s features at one layer as :meth:`FeatureStore.put` takes them: rows (n, d_in), the row
    count and the Gram statistics (d_in, d_in) when kept; what a solve in another process needs."""
    out = {key: feats.store.get(i, key)}
    for suffix in ("#gram", "#n"):
        t = feats.store.get(i, key + suffix)
        if t is not None:
            out[key + suffix] = t
    return out


def features_from(pipe, stage: str, keys: list[str], concepts: list[ConceptFeaturesInput],
                  features: list[dict[str, Tensor]]) -> StageFeatures:
    """A stage's features rebuilt from each concept's :func:`concept_features` (``features[i]``: concept i's,
    for every key), against ``pipe``'s current weights, as the collectors snapshot them."""
    weights, shapes, versions = _snapshot_weights(pipe, keys)
    store = FeatureStore(len(concepts))
    for i, f in enumerate(features):
        store.put(i, dict(f))
    return StageFeatures(stage, keys, concepts, store, weights, shapes, versions)


__all__ = [
    "ConceptFeaturesInput", "concept_features", "features_from", "FeatureStore", "StageFeatures", "collect_text_encoder",
    "collect_cross_attention", "collect_spatial", "conditioning", "sample_latents", "spill_directory", "SPILL_PREFIX",
    "cross_attention_keys", "spatial_keys", "native_resolution", "spatial_resolution", "token_ids",
]
