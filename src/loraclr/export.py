"""Export of a merge: the output folder, its layout defined once here (the readers in
:mod:`loraclr.pipeline` use the same names).

Output folder::

    loraclr.json            MANIFEST: what is where; ``loraclr generate`` reads it
    pipeline/               PIPELINE: diffusers pipeline with the merged weights and the added tokens
    merged.safetensors      SINGLE_FILE: the same as one checkpoint (only when the recipe asks for it)
    merged_lora_kohya.safetensors, merged_lora_diffusers.safetensors    lora_file(fmt): D = W_merged - W0
    embeddings/             EMBEDDINGS: the added tokens (A1111 format, one file per token, new names)
    prompts.json            PROMPTS: concept -> trigger to use in prompts (renamed tokens), feature prompts, tokens
    recipe.yaml             RECIPE: the resolved recipe and package versions
    report.json             REPORT: per-layer solver reports, fidelity numbers, timings per phase (and a
                            distributed merge's workers: tasks and peak memory per process)
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from torch import Tensor

from loraclr.io import factorize, save_embeddings, save_lora
from loraclr.io.checkpoint import save_single_file
from loraclr.io.safe import atomic_write
from loraclr.lora import LoraLayer
from loraclr.models import find_module
from loraclr.recipe import Recipe, dump_recipe
from loraclr.surgery.tokens import TokenTable

if TYPE_CHECKING:  # annotations only: the merge imports this module, and generation must not load feature collection
    from loraclr.features.collect import ConceptFeaturesInput
    from loraclr.merging import MergedModel

# --- the output folder's layout ----------------------------------------------------------------------------

MANIFEST = "loraclr.json"  # marks a merged output folder
PIPELINE = "pipeline"
SINGLE_FILE = "merged.safetensors"
EMBEDDINGS = "embeddings"
PROMPTS = "prompts.json"
RECIPE = "recipe.yaml"
REPORT = "report.json"


def lora_file(fmt: str) -> str:
    """The merged LoRA's file name in format ``fmt`` (kohya, diffusers)."""
    return f"merged_lora_{fmt}.safetensors"


# --- writing ------------------------------------------------------------------------------------------------


@dataclass
class MergeSummary:
    """What ``merge`` did: where the files are, how long each phase took, and how faithful the result is.

    fidelity: concept -> {"merged": mean relative error of the merged layers on the concept's own
    features, "sum": the same for the naive sum of deltas} (lower is better; only with features).
    workers: a distributed executor's worker processes (worker, pid, node, tasks, peak_rss_mb) and the
    driver's peak memory; empty for a local merge.
    """

    out_dir: Path
    method: str
    family: str
    n_concepts: int
    n_layers: int
    timings: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    lora_errors: dict[str, float] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)


def package_versions() -> dict[str, str]:
    """Python and the packages a merge depends on, written beside every output."""
    out = {"python": platform.python_version()}
    for pkg in ("loraclr", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def jsonable(v: Any) -> Any:
    """``v`` as JSON can hold it: small tensors as lists, large ones named by shape, non-finite floats as text."""
    if isinstance(v, Tensor):
        return v.tolist() if v.numel() < 10_000 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_merged(recipe: Recipe, out_dir: Path, m: MergedModel, inputs: list[str]) -> MergeSummary:
    """Export ``m`` into ``out_dir`` (the layout in the module docstring): every file goes into a temporary
    folder beside it, renamed onto ``out_dir`` only when all of it is written. ``inputs``: the files the
    merge read, recorded in the manifest."""
    timings, config, concepts = m.timings, m.config, m.concepts
    method = recipe.method.name

    t = time.perf_counter()
    summary = MergeSummary(out_dir=out_dir, method=method, family=m.family, n_concepts=len(concepts),
                           n_layers=len(m.offsets))
    summary.fidelity = fidelity_summary(m.reports, [c.name for c in concepts])
    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        files = export_files(tmp, recipe, m.pipe, m.family, m.offsets, m.table, concepts, inputs, summary)
        report = {
            "method": method,
            "config": jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else str(config),
            "family": m.family,
            "concepts": [c.name for c in concepts],
            "fidelity": summary.fidelity,
            "lora_export": summary.lora_errors,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "stages": {name: {k: round(v, 3) for k, v in st.items()} for name, st in m.stages.items()},
            "layers": m.reports,
        }
        if m.workers:
            report["executor"] = {"kind": recipe.executor.kind, "workers": m.workers}
        timings["export"] = time.perf_counter() - t
        report["timings_s"]["export"] = round(timings["export"], 3)
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        files.append(REPORT)
    summary.timings = timings
    summary.files = files
    summary.workers = m.workers
    return summary


def fidelity_summary(reports: dict[str, dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Per concept, the mean over layers of the per-layer fidelity numbers in ``reports``."""
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        merged = [r["fidelity"]["merged"][i] for r in reports.values() if "fidelity" in r]
        summed = [r["fidelity"]["sum"][i] for r in reports.values() if "fidelity" in r]
        if merged:
            out[name] = {"merged": sum(merged) / len(merged), "sum": sum(summed) / len(summed),
                         "layers": len(merged)}
    return out


def export_files(tmp: Path, recipe: Recipe, pipe, family: str, offsets: Mapping[str, Tensor], table: TokenTable,
            concepts: list[ConceptFeaturesInput], inputs: list[str], summary: MergeSummary) -> list[str]:
    files: list[str] = []
    out = recipe.output
    manifest: dict[str, Any] = {"format": "loraclr-merge", "version": 1, "family": family,
                                "method": recipe.method.name, "prompts": PROMPTS}
    if out.pipeline:
        pipe.save_pretrained(str(tmp / PIPELINE), safe_serialization=True)
        manifest["pipeline"] = PIPELINE
        files.append(PIPELINE)
    if out.single_file:
        save_single_file(pipe, tmp / SINGLE_FILE)
        manifest["single_file"] = SINGLE_FILE
        files.append(SINGLE_FILE)
    # Factorise once: the truncated SVDs dominate export time, and every LoRA format stores the same factors.
    factors: dict[str, LoraLayer] = {}
    errs: list[float] = []
    if out.lora_formats:
        for k, v in offsets.items():
            try:
                factors[k], err = factorize(v.reshape(find_module(pipe, k).weight.shape), rank=out.rank,
                                            energy=out.energy)
            except ValueError as e:
                raise ValueError(f"exporting the merged LoRA, layer {k}: {e}") from None
            errs.append(err)
    manifest["loras"] = {}
    for fmt in out.lora_formats:
        if not factors:
            break
        name = lora_file(fmt)
        save_lora(factors, tmp / name, format=fmt, family=family, merged_from=[c.lora for c in recipe.concepts],
                  metadata={"loraclr.method": recipe.method.name}, unet_config=dict(pipe.unet.config))
        summary.lora_errors[fmt] = {"max_rel_error": max(errs), "mean_rel_error": sum(errs) / len(errs),
                                    "max_rank": max(f.rank for f in factors.values())}
        manifest["loras"][fmt] = name
        files.append(name)
    if table.tokens:
        save_embeddings(table.learned_tokens(), tmp / EMBEDDINGS, "a1111")
        manifest["embeddings"] = EMBEDDINGS
        files.append(EMBEDDINGS)
    prompt_map = {
        "concepts": {
            c.name: {
                "trigger": c.trigger,
                "original_trigger": (rc.trigger or " ".join(t.original for t in table.tokens if t.concept == c.name)),
                "example": f"photo of a {c.trigger}",
                "feature_prompts": c.prompts,
                "layerwise": table.uses_layerwise(c.trigger),
            }
            for c, rc in zip(concepts, recipe.concepts, strict=True)
        },
        "tokens": table.to_json(),
        "note": "prompts may use {concept name} placeholders with `loraclr generate`; layer-wise tokens need "
                "loraclr.pipeline.generate (a different embedding per cross-attention layer)",
    }
    (tmp / PROMPTS).write_text(json.dumps(prompt_map, indent=1))
    files.append(PROMPTS)
    recipe_text = dump_recipe(recipe)
    recipe_text += yaml.safe_dump({"versions": package_versions()}, sort_keys=False)
    (tmp / RECIPE).write_text(recipe_text)
    files.append(RECIPE)
    manifest["inputs"] = inputs
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    files.append(MANIFEST)
    return files
