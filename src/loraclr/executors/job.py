"""What every executor runs: the merge's inputs loaded (:class:`MergeJob`), a stage (:class:`Stage`) and the
per-layer solve (:func:`solve_problems`).

The driver (:mod:`loraclr.merging`) and each worker of a distributed executor build a :class:`MergeJob` from
the same recipe with :func:`load_job`, so every process sees the same base model, LoRAs and renamed tokens,
and runs the same feature collection and solve code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from loraclr.export import jsonable
from loraclr.features.collect import ConceptFeaturesInput, concept_deltas
from loraclr.io import load_embeddings, load_lora
from loraclr.io.checkpoint import fuse_deltas
from loraclr.lora import LoraSet
from loraclr.merge.api import LayerProblem, MergeMethod
from loraclr.merge.fidelity import fidelity
from loraclr.merge.methods import get_method, make_config, solve_layers
from loraclr.models import find_module
from loraclr.pipeline import family_of, load_base
from loraclr.recipe import Recipe
from loraclr.surgery.hooks import cross_attention_modules
from loraclr.surgery.tokens import TokenTable, add_tokens, plan_tokens, text_components, trigger_positions

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total): feature bars


# --- the inputs --------------------------------------------------------------------------------------------


def check_lora_fits(pipe, lora: LoraSet, family: str, where: str) -> None:
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
class MergeJob:
    """A merge's inputs as one process holds them: the base pipeline (tokens added), the method and its
    config, each concept's LoRA layers and resolved prompts, and the token table."""

    recipe: Recipe
    pipe: Any
    family: str
    spec: MergeMethod
    config: Any
    concepts: list[ConceptFeaturesInput]
    table: TokenTable


def load_job(recipe: Recipe) -> MergeJob:
    """Load the base and the recipe's LoRAs, check that they fit, add the learned tokens (renamed per
    concept) and resolve every concept's trigger and prompts."""
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
        check_lora_fits(pipe, lora, family, at)
        loras.append(lora)
    concepts, table = prepare_concepts(recipe, pipe, loras)
    return MergeJob(recipe, pipe, family, spec, config, concepts, table)


# --- a stage -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of the merge (:mod:`loraclr.merging`): its name (the reports' ``stage``), the layer keys it
    solves, and how their features are collected: ``collect(pipe, concepts, table, settings, progress, **kw)
    -> StageFeatures``, a collector of :mod:`loraclr.features.collect`; None for feature-free methods, whose
    problems are W0 and the deltas alone. spill: the features are large (every spatial UNet layer) and go to
    disk beside the output on the local executor. fuse_now: its offsets are added to the model before the
    next stage collects features (the text encoder: the UNet stages read the merged one)."""

    name: str
    keys: tuple[str, ...]
    collect: Callable | None = None
    spill: bool = False
    fuse_now: bool = False


class Executor(Protocol):
    def run_stage(self, stage: Stage, offsets: MutableMapping, reports: dict[str, dict],
                  timings: dict[str, float]) -> list[str]:
        """Collect ``stage``'s features for every concept, build a problem per layer, solve each; the offsets
        D (out, in) go into ``offsets`` one layer at a time and in ``stage.keys`` order, the per-layer reports
        into ``reports``; seconds are added to ``timings["features"]`` and ``timings["solve"]``. Returns the
        keys solved."""
        ...

    def fused(self, keys: list[str]) -> None:
        """The driver added these offsets to its model: later feature runs must see them too."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """Per worker process: what it ran and its peak memory (empty for the local executor)."""
        ...

    def close(self) -> None:
        ...


# --- solving -----------------------------------------------------------------------------------------------


def solve_problems(problems, spec, config, stage: str, progress: bool, reports: dict[str, dict],
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


def plain_problems(pipe, concepts: list[ConceptFeaturesInput], keys: list[str]):
    """Feature-free problems. Deltas stay LoRA factors (LowRankDeltas) where every concept has them, so a
    sum of twelve rank-16 deltas is one rank-192 product, not twelve dense deltas."""
    for key in keys:
        w = find_module(pipe, key).weight.detach()
        shape = tuple(w.shape)
        deltas = concept_deltas(concepts, key, shape)
        # no copy of W0: methods are pure, and the weights are fused only after every layer is solved
        yield LayerProblem(key=key, W0=w.float().reshape(shape[0], -1), deltas=deltas,
                           concept_names=[c.name for c in concepts])


def fuse(pipe, offsets: Mapping[str, Tensor], keys: list[str] | None = None) -> None:
    """Add the offsets (of ``keys``, default all) to the weights, a layer at a time (spilled offsets are read
    back one by one). Every offset was checked finite when it was solved and matches its module's shape."""
    for k in offsets if keys is None else keys:
        fuse_deltas(pipe, {k: offsets[k].reshape(find_module(pipe, k).weight.shape)})


def feature_bars(progress: bool) -> tuple[Progress | None, Callable[[], None]]:
    """(update, close): one tqdm bar of concepts done per stage; (None, no-op) without progress."""
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
