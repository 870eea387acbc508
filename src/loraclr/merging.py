"""The merge, end to end: recipe -> features -> per-layer solves, stage by stage -> written outputs.

Order (each stage uses the result of the one before):
1. learned tokens renamed per concept and added to the tokenizer(s) / text encoder(s);
2. text-encoder layers: features with each concept's LoRA, solved, merged weights written into the model;
3. UNet cross-attention to_k / to_v: features from the merged text encoder, solved;
4. every other UNet layer: features from a short sampling run per concept with its UNet LoRA, solved;
then the UNet offsets are written and everything is exported into a temporary folder beside the output,
renamed onto it only when all of it succeeded (an error leaves nothing behind).

Each stage is the same four steps: collect features per concept -> build a problem per layer -> solve each
layer -> fuse. The recipe's executor (:mod:`loraclr.executors`: ``local`` in this process, or ``ray``) decides
where the per-concept and per-layer work runs; this module decides the order and what is fused when.

The written output and its layout: :mod:`loraclr.export`; offsets waiting for export: :mod:`loraclr.offsets`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraclr.executors import open_executor
from loraclr.executors.job import MergeJob, Stage, load_job, prepare_concepts
from loraclr.executors.job import check_lora_fits as _check_lora_fits
from loraclr.executors.job import fuse as _fuse
from loraclr.executors.job import plain_problems as _plain_problems
from loraclr.executors.job import solve_problems as _solve
from loraclr.export import MergeSummary, write_merged
from loraclr.features.collect import (
    SPILL_PREFIX,
    ConceptFeaturesInput,
    collect_cross_attention,
    collect_spatial,
    collect_text_encoder,
    cross_attention_keys,
)
from loraclr.io.safe import atomic_prefixes, check_output_path, sweep_stale
from loraclr.lora import split_key
from loraclr.merge.fidelity import fidelity
from loraclr.offsets import OFFSETS_PREFIX, OffsetStore, default_offset_budget
from loraclr.pipeline import Model, resolve_base
from loraclr.recipe import Recipe
from loraclr.surgery.tokens import TokenTable

# _solve, _plain_problems, _fuse, _check_lora_fits: the per-layer steps (loraclr.executors.job) under the names
# the benchmarks and tests know
__all__ = ["MergeSummary", "MergedModel", "OffsetStore", "fidelity", "merge", "merge_model", "prepare_concepts",
           "stages", "_check_lora_fits", "_fuse", "_plain_problems", "_solve"]

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


# --- the stages ---------------------------------------------------------------------------------------------


def stages(job: MergeJob) -> list[Stage]:
    """The merge's stages in order (module docstring); a feature-free method is one stage over every layer."""
    all_keys = sorted({k for c in job.concepts for k in c.layers})
    if not job.spec.needs_features:
        return [Stage("all", tuple(all_keys))]
    te_keys = [k for k in all_keys if split_key(k)[0] != "unet"]
    unet_keys = [k for k in all_keys if k.startswith("unet.")]
    cross = cross_attention_keys(job.pipe, unet_keys)
    spatial = [k for k in unet_keys if k not in set(cross)]
    out = []
    if te_keys:  # fused at once: the UNet stages read the merged text encoder
        out.append(Stage("text_encoder", tuple(te_keys), collect_text_encoder, fuse_now=True))
    if cross:
        out.append(Stage("cross_attention", tuple(cross), collect_cross_attention))
    if spatial:  # every UNet feature run uses the base UNet + one LoRA: UNet offsets are fused after the last
        out.append(Stage("spatial", tuple(spatial), collect_spatial, spill=True))
    return out


# --- the merge ---------------------------------------------------------------------------------------------


@dataclass
class MergedModel:
    """The result of :func:`merge_model`, in memory: the pipeline with merged weights and added tokens, the
    offsets D (out, in) per layer (an :class:`OffsetStore`: large models keep some on disk until the
    store is closed), the token table, each concept's resolved trigger, per-layer reports,
    timings per phase (load, features, solve; a distributed executor adds ``workers``: starting them) and per
    stage, and, for a distributed executor, each worker process's tasks and peak memory."""

    pipe: Any
    family: str
    config: Any
    offsets: MutableMapping
    table: TokenTable
    concepts: list[ConceptFeaturesInput]
    reports: dict[str, dict]
    timings: dict[str, float]
    workers: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)  # stage -> features_s, solve_s, layers

    def model(self):
        """A :class:`loraclr.pipeline.Model` (for ``generate`` and the evaluators); triggers are the renamed ones."""
        return Model(self.pipe, self.table, {c.name: c.trigger for c in self.concepts})


def merge_model(recipe: Recipe, *, progress: bool = True, spill_parent: str | Path | None = None,
                offsets_max_bytes: int | None | str = "auto") -> MergedModel:
    """Load the base and the recipe's LoRAs, collect features and solve stage by stage (module docstring) with
    the recipe's executor; nothing is written (spilled features go to a temporary folder under
    ``spill_parent``, then are removed). Offsets beyond ``offsets_max_bytes`` are kept on disk there as well
    (:class:`OffsetStore`; "auto": :func:`default_offset_budget`, None: all in memory). :func:`merge` writes
    the result; benchmarks use this directly."""
    recipe.validate()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    job = load_job(recipe)
    timings["load"] = time.perf_counter() - t

    reports: dict[str, dict] = {}
    budget = default_offset_budget(job.pipe) if offsets_max_bytes == "auto" else offsets_max_bytes
    offsets = OffsetStore(budget, spill_parent)
    timings.update(features=0.0, solve=0.0)
    stage_timings: dict[str, dict] = {}
    executor = None
    try:
        executor = open_executor(recipe.executor, job, progress=progress, spill_parent=spill_parent)
        fuse_last: list[str] = []
        for stage in stages(job):
            # features per concept -> a problem per layer -> a solve per layer, where the executor runs them
            before = {k: timings.get(k, 0.0) for k in ("features", "solve")}
            solved = executor.run_stage(stage, offsets, reports, timings)
            # each stage's own seconds: what bench/scale.py builds its task costs from
            stage_timings[stage.name] = {"features_s": timings["features"] - before["features"],
                                         "solve_s": timings["solve"] - before["solve"], "layers": len(solved)}
            if stage.fuse_now:
                _fuse(job.pipe, offsets, solved)
                executor.fused(solved)
            else:
                fuse_last += solved
        _fuse(job.pipe, offsets, fuse_last)
        workers = executor.workers()
    except BaseException:
        offsets.close()
        raise
    finally:
        if executor is not None:
            executor.close()
    return MergedModel(job.pipe, job.family, job.config, offsets, job.table, job.concepts, reports, timings,
                       workers, stage_timings)


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


