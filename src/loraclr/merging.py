"""The merge, end to end: recipe -> features -> per-layer solves, stage by stage -> written outputs.

Order (each stage uses the result of the one before):
1. learned tokens renamed per concept and added to the tokenizer(s) / text encoder(s);
2. text-encoder layers: features with each concept's LoRA, solved, merged weights written into the model;
3. UNet cross-attention to_k / to_v: features from the merged text encoder, solved;
4. every other UNet layer: features from a short sampling run per concept with its UNet LoRA, solved;
then the UNet offsets are written and everything is exported into a temporary folder beside the output,
renamed onto it only when all of it succeeded (an error leaves nothing behind).

The written output and its layout: :mod:`loraclr.export`; offsets waiting for export: :mod:`loraclr.offsets`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from loraclr.export import MergeSummary, jsonable, write_merged
from loraclr.features.collect import (
    SPILL_PREFIX,
    ConceptFeaturesInput,
    collect_cross_attention,
    collect_spatial,
    collect_text_encoder,
    concept_deltas,
    cross_attention_keys,
    spill_directory,
)
from loraclr.io import load_embeddings, load_lora
from loraclr.io.checkpoint import fuse_deltas
from loraclr.io.safe import atomic_prefixes, check_output_path, sweep_stale
from loraclr.lora import LoraSet, split_key
from loraclr.merge.api import LayerProblem
from loraclr.merge.fidelity import fidelity
from loraclr.merge.methods import get_method, make_config, solve_layers
from loraclr.models import find_module
from loraclr.offsets import OFFSETS_PREFIX, OffsetStore, default_offset_budget
from loraclr.pipeline import Model, family_of, load_base, resolve_base
from loraclr.recipe import Recipe
from loraclr.surgery.hooks import cross_attention_modules
from loraclr.surgery.tokens import TokenTable, add_tokens, plan_tokens, text_components, trigger_positions

__all__ = ["MergeSummary", "MergedModel", "OffsetStore", "fidelity", "merge", "merge_model", "prepare_concepts"]

log = logging.getLogger(__name__)

# --- checks before any work ------------------------------------------------------------------------------


def _check_inputs(recipe: Recipe, out_dir: Path, overwrite: bool) -> list[str]:
    where = recipe.source or "recipe"
    inputs = []
    for i, c in enumerate(recipe.concepts):
        for what, p in (("lora", c.lora), ("embeddings", c.embeddings)):
            if p is None:
                continue
            if not Path(p).exists():
                raise FileNotFoundError(f"{where}: concepts[{i}] ({c.name}): {what} file {p} not found")
            inputs.append(p)
    base = resolve_base(recipe.base.path)
    inputs.append(str(base))
    if recipe.base.config:
        inputs.append(recipe.base.config)
    check_output_path(out_dir, inputs)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; remove it, choose another path or pass --overwrite")
    return inputs


def _check_lora_fits(pipe, lora: LoraSet, family: str, where: str) -> None:
    if lora.family in ("sd1", "sd2", "sdxl") and lora.family != family:
        raise ValueError(
            f"{where}: {lora.source}: the LoRA is for {lora.family} but the base model is {family}; "
            "all LoRAs must be trained on the recipe's base model"
        )
    for key, layer in lora.layers.items():
        try:
            module = find_module(pipe, key)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}: {lora.source}: layer {key} has no module in the base model "
                             f"({e.args[0]}); the LoRA is for another base model") from None
        w = getattr(module, "weight", None)
        if w is None or math.prod(layer.weight_shape) != w.numel() or layer.weight_shape[0] != w.shape[0]:
            raise ValueError(
                f"{where}: {lora.source}: layer {key} changes a {tuple(layer.weight_shape)} weight but the base "
                f"model's is {tuple(w.shape) if w is not None else None}; the LoRA is for another base model"
            )


# --- solving ---------------------------------------------------------------------------------------------


def _solve(problems, spec, config, stage: str, progress: bool, reports: dict[str, dict],
           total: int | None = None, offsets: MutableMapping | None = None) -> MutableMapping:
    """Solve layer by layer with the one per-layer driver (:func:`loraclr.merge.methods.solve_layers`;
    ``problems`` may be a generator, so each layer's features live only while it is solved); returns offsets
    (out, in) by key and fills ``reports`` with the method's report, the time and the fidelity on each
    concept's own features."""
    offsets = {} if offsets is None else offsets
    for p, res, dt in solve_layers(problems, spec.name, config, progress=progress, total=total,
                                   desc=f"solve ({stage}, {spec.name})"):
        off = res.offset.detach().float().reshape(p.W0.shape)
        offsets[p.key] = off
        rep = dict(jsonable(res.report))
        rep.update(stage=stage, time_s=round(dt, 4))
        fid = fidelity(p, off)
        if fid is not None:
            rep["fidelity"] = fid
        reports[p.key] = rep
    return offsets


def _plain_problems(pipe, concepts: list[ConceptFeaturesInput], keys: list[str]):
    """Feature-free problems. Deltas stay LoRA factors (LowRankDeltas) where every concept has them, so a
    sum of twelve rank-16 deltas is one rank-192 product, not twelve dense deltas."""
    for key in keys:
        w = find_module(pipe, key).weight.detach()
        shape = tuple(w.shape)
        deltas = concept_deltas(concepts, key, shape)
        # no copy of W0: methods are pure, and the weights are fused only after every layer is solved
        yield LayerProblem(key=key, W0=w.float().reshape(shape[0], -1), deltas=deltas,
                           concept_names=[c.name for c in concepts])


def _fuse(pipe, offsets: Mapping[str, Tensor], keys: list[str] | None = None) -> None:
    """Add the offsets (of ``keys``, default all) to the weights, a layer at a time (spilled offsets are read
    back one by one). Every offset was checked finite when it was solved and matches its module's shape."""
    for k in offsets if keys is None else keys:
        fuse_deltas(pipe, {k: offsets[k].reshape(find_module(pipe, k).weight.shape)})


# --- the merge ---------------------------------------------------------------------------------------------


def _progress_fn(progress: bool):
    if not progress:
        return None, lambda: None
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"features ({stage})", unit="concept")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close():
        for b in bars.values():
            b.close()

    return update, close


def prepare_concepts(recipe: Recipe, pipe, loras: list[LoraSet]) -> tuple[list[ConceptFeaturesInput], TokenTable]:
    """Rename learned tokens, add them to the model, and resolve every concept's trigger and prompts."""
    where = recipe.source or "recipe"
    n_layers = len(cross_attention_modules(pipe.unet))
    table = TokenTable(n_layers=n_layers)
    for c, lora in zip(recipe.concepts, loras, strict=True):
        table.tokens.extend(plan_tokens(c.name, lora.tokens, n_layers, source=lora.source))
    concepts = []
    for i, (c, lora) in enumerate(zip(recipe.concepts, loras, strict=True)):
        at = f"{where}: concepts[{i}] ({c.name})"
        own = [t for t in table.tokens if t.concept == c.name]
        trigger = c.trigger or " ".join(t.original for t in own)
        if not trigger.strip():
            raise ValueError(
                f"{at}: no trigger: {lora.source} carries no learned tokens, so the concept needs "
                "'trigger' (the words its LoRA was trained with, e.g. 'sks person')"
            )
        missing = [t.original for t in own if t.original not in trigger]
        if missing and c.trigger:
            log.warning("%s: learned tokens %s are not in the trigger %r", at, missing, trigger)
        renamed = table.rename(c.name, trigger)
        prompts = [table.rename(c.name, p.replace("{trigger}", trigger)) for p in c.prompt_templates]
        strengths = {"unet": c.unet_strength, "text_encoder": c.text_encoder_strength,
                     "text_encoder_2": c.text_encoder_strength}
        concepts.append(ConceptFeaturesInput(c.name, dict(lora.layers), strengths, prompts, renamed))
    add_tokens(pipe, table)
    tokenizer = text_components(pipe)[0][1]
    for i, c in enumerate(concepts):  # fail now, not after an hour of feature collection
        for p in c.prompts:
            for layer in (range(n_layers) if table.uses_layerwise(p) else [None])[:1]:
                trigger_positions(tokenizer, table.expand(p, layer), table.expand(c.trigger, layer),
                                  where=f"{where}: concepts[{i}] ({c.name})")
    return concepts, table


@dataclass
class MergedModel:
    """The result of :func:`merge_model`, in memory: the pipeline with merged weights and added tokens, the
    offsets D (out, in) per layer (an :class:`OffsetStore`: large models keep some on disk until the
    store is closed), the token table, each concept's resolved trigger, per-layer reports and
    timings per phase (load, features, solve)."""

    pipe: Any
    family: str
    config: Any
    offsets: MutableMapping
    table: TokenTable
    concepts: list[ConceptFeaturesInput]
    reports: dict[str, dict]
    timings: dict[str, float]

    def model(self):
        """A :class:`loraclr.pipeline.Model` (for ``generate`` and the evaluators); triggers are the renamed ones."""
        return Model(self.pipe, self.table, {c.name: c.trigger for c in self.concepts})


def merge_model(recipe: Recipe, *, progress: bool = True, spill_parent: str | Path | None = None,
                offsets_max_bytes: int | None | str = "auto") -> MergedModel:
    """Load the base and the recipe's LoRAs, collect features and solve stage by stage (module docstring);
    nothing is written (spilled features go to a temporary folder under ``spill_parent``, then are removed).
    Offsets beyond ``offsets_max_bytes`` are kept on disk there as well (:class:`OffsetStore`; "auto":
    :func:`default_offset_budget`, None: all in memory). :func:`merge` writes the result; benchmarks use this
    directly."""
    recipe.validate()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    spec = get_method(recipe.method.name)
    try:
        config = make_config(recipe.method.name, **recipe.method.resolved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{recipe.source or 'recipe'}: method settings: {e}") from None

    pipe = load_base(recipe.base.path, config=recipe.base.config)
    family = family_of(pipe)
    unet_config = dict(pipe.unet.config)
    loras = []
    for i, c in enumerate(recipe.concepts):
        at = f"{recipe.source or 'recipe'}: concepts[{i}] ({c.name})"
        try:
            # family: the reader refuses a LoRA made for another family, naming the file's and the base's
            lora = load_lora(c.lora, allow_pickle=recipe.allow_pickle, unet_config=unet_config, family=family)
        except ValueError as e:
            raise ValueError(f"{at}: {e}") from e
        if c.embeddings:
            lora.tokens = list(lora.tokens) + load_embeddings(c.embeddings, allow_pickle=recipe.allow_pickle)
        _check_lora_fits(pipe, lora, family, at)
        loras.append(lora)
    concepts, table = prepare_concepts(recipe, pipe, loras)
    timings["load"] = time.perf_counter() - t

    settings = recipe.features
    reports: dict[str, dict] = {}
    update, close_bars = _progress_fn(progress)
    all_keys = sorted({k for c in concepts for k in c.layers})
    te_keys = [k for k in all_keys if split_key(k)[0] != "unet"]
    budget = default_offset_budget(pipe) if offsets_max_bytes == "auto" else offsets_max_bytes
    offsets = OffsetStore(budget, spill_parent)
    timings.update(features=0.0, solve=0.0)
    try:
        if not spec.needs_features:
            t = time.perf_counter()
            _solve(_plain_problems(pipe, concepts, all_keys), spec, config, "all", progress, reports,
                   len(all_keys), offsets)
            timings["solve"] += time.perf_counter() - t
            _fuse(pipe, offsets)
        else:
            def stage(collect, name: str, **kw) -> dict[str, Tensor]:
                """Collect one stage's features, then solve its layers; features are dropped right after."""
                t = time.perf_counter()
                feats = collect(pipe, concepts, table, settings, update, **kw)
                timings["features"] += time.perf_counter() - t
                t = time.perf_counter()
                before = set(offsets)
                _solve(feats.problems(), spec, config, name, progress, reports, len(feats.keys), offsets)
                timings["solve"] += time.perf_counter() - t
                return [k for k in offsets if k not in before]

            if te_keys:
                _fuse(pipe, offsets, stage(collect_text_encoder, "text_encoder"))  # the next stage reads it
            unet_keys = [k for k in all_keys if k.startswith("unet.")]
            unet_solved: list[str] = []
            if cross_attention_keys(pipe, unet_keys):
                unet_solved += stage(collect_cross_attention, "cross_attention")
            if set(unet_keys) - set(unet_solved):
                with spill_directory(spill_parent) as spill:
                    unet_solved += stage(collect_spatial, "spatial", spill_dir=spill)
            _fuse(pipe, offsets, unet_solved)  # only now: every UNet feature run used the base UNet + one LoRA
    except BaseException:
        offsets.close()
        raise
    finally:
        close_bars()
    return MergedModel(pipe, family, config, offsets, table, concepts, reports, timings)


def merge(recipe: Recipe, out_dir: str | Path, *, progress: bool = True, overwrite: bool = False) -> MergeSummary:
    """Merge the recipe's concept LoRAs into its base model and write everything to ``out_dir``.

    Nothing is written unless the whole merge succeeds. Returns a :class:`MergeSummary` (timings per phase,
    per-concept fidelity, files written), which benchmarks and the demo use.
    """
    out_dir = Path(out_dir)
    recipe.validate()
    inputs = _check_inputs(recipe, out_dir, overwrite)
    # what a killed merge left beside the output: spilled features and offsets, a half-written output
    sweep_stale(out_dir.parent, (SPILL_PREFIX, OFFSETS_PREFIX, *atomic_prefixes(out_dir)))
    m = merge_model(recipe, progress=progress, spill_parent=out_dir.parent)
    try:
        summary = write_merged(recipe, out_dir, m, inputs)
    finally:
        if isinstance(m.offsets, OffsetStore):
            m.offsets.close()
    log.info("merged %d concepts (%d layers) with %s into %s in %.1f s", summary.n_concepts, summary.n_layers,
             summary.method, out_dir, sum(summary.timings.values()))
    return summary


