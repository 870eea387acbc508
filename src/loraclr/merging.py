"""The merge, end to end: recipe -> features -> per-layer solves, stage by stage -> written outputs.

Order (DESIGN.md §2; each stage uses the result of the one before):
1. learned tokens renamed per concept and added to the tokenizer(s) / text encoder(s);
2. text-encoder layers: features with each concept's LoRA, solved, merged weights written into the model;
3. UNet cross-attention to_k / to_v: features from the merged text encoder, solved;
4. every other UNet layer: features from a short sampling run per concept with its UNet LoRA, solved;
then the UNet offsets are written and everything is exported into a temporary folder beside the output,
renamed onto it only when all of it succeeded (an error leaves nothing behind).

Output folder::

    loraclr.json            manifest (what is where; ``loraclr generate`` reads it)
    pipeline/               diffusers pipeline with the merged weights and the added tokens
    merged_lora_kohya.safetensors, merged_lora_diffusers.safetensors    D = W_merged - W0 as a LoRA
    embeddings/             the added tokens (A1111 format, one file per token, new names)
    prompts.json            concept -> trigger to use in prompts (renamed tokens), feature prompts, tokens
    recipe.yaml             the resolved recipe and package versions
    report.json             per-layer solver reports, fidelity numbers, timings per phase
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
from loraclr.features.hooks import cross_attention_modules
from loraclr.features.text import TokenTable, add_tokens, plan_tokens, text_components, trigger_positions
from loraclr.io.safe import atomic_prefixes, owner_tag, sweep_stale
from loraclr.lora import LoraLayer, LoraSet, split_key
from loraclr.merge._common import summed_deltas
from loraclr.merge.api import LayerProblem
from loraclr.merge.methods import solve_layers
from loraclr.models import find_module
from loraclr.recipe import Recipe, dump_recipe

log = logging.getLogger(__name__)

@dataclass
class MergeSummary:
    """What ``merge`` did: where the files are, how long each phase took, and how faithful the result is.

    fidelity: concept -> {"merged": mean relative error of the merged layers on the concept's own
    features, "sum": the same for the naive sum of deltas} (lower is better; only with features).
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


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("loraclr", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- checks before any work ------------------------------------------------------------------------------


def _check_inputs(recipe: Recipe, out_dir: Path, overwrite: bool) -> list[str]:
    from loraclr.io.safe import check_output_path
    from loraclr.pipeline import resolve_base

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


FIDELITY_ROWS = 256  # rows per concept behind the fidelity numbers (see fidelity)


def fidelity(problem: LayerProblem, offset: Tensor, max_rows: int | None = FIDELITY_ROWS) -> dict[str, list[float]] | None:
    """Per concept i, on its own rows X_i: ||X_i (D - dW_i)^T|| / ||X_i (W0 + dW_i)^T|| for the merged offset
    D and for the naive sum of deltas (the 'before merging' stacking). None without rows.

    A diagnostic, so it uses at most ``max_rows`` rows per concept, evenly spaced over the block (None: all):
    three (rows x in x out) products per concept and layer cost more than the converged solve itself at the
    default 2048 rows (12 SD 1.5 concepts: ~35 TFLOP, minutes on a CPU). Measured on the miniature world's
    spatial layers (3 random LoRAs, converged, 2048 rows): per layer the numbers moved by 0.5 % (median, at
    most 17 %), the per-concept means over layers that the summary reports by at most 0.3 %. Runs with
    max_rows <= 256 are unchanged."""
    if not problem.X or any(x is None for x in problem.X):
        return None
    D = offset.reshape(offset.shape[0], -1).float()
    total = summed_deltas(problem, torch.float32, D.device)
    merged, summed = [], []
    for X, dW in zip(problem.X, problem.deltas, strict=True):
        if max_rows and X.shape[0] > max_rows:
            X = X[torch.linspace(0, X.shape[0] - 1, max_rows).round().long()]
        X = X.float()
        target = (X @ (problem.W0.float() + dW.float()).T).norm().clamp_min(1e-12)
        merged.append(float((X @ (D - dW).T).norm() / target))
        summed.append(float((X @ (total - dW).T).norm() / target))
    return {"merged": merged, "sum": summed}


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.tolist() if v.numel() < 10_000 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


OFFSETS_PREFIX = "loraclr-offsets-"


class OffsetStore(MutableMapping):
    """The solved offsets D (out, in) by layer key: in memory up to ``max_bytes`` in all, the rest in a
    temporary folder under ``parent`` (one safetensors file per layer, read back on access) that is removed
    with the store (:meth:`close`, or when it is garbage-collected).

    Why: a merge keeps every offset until all stages are solved (the UNet's feature runs need the base UNet),
    and the offsets are as large as the targeted weights: ~7.5 GB in fp32 for SDXL, next to a 14 GB fp32
    pipeline. ``max_bytes=None`` keeps everything in memory.
    """

    def __init__(self, max_bytes: int | None = None, parent: str | Path | None = None):
        self.max_bytes, self.parent = max_bytes, parent
        self._mem: dict[str, Tensor] = {}
        self._files: dict[str, Path] = {}
        self._order: dict[str, None] = {}  # insertion order of all keys
        self._bytes = 0
        self._written = 0  # spill files written (names them)
        self._dir: tempfile.TemporaryDirectory | None = None

    def __setitem__(self, key: str, value: Tensor) -> None:
        if key in self:  # like a dict: an overwritten key keeps its place
            self._drop(key)
        size = value.numel() * value.element_size()
        if self.max_bytes is None or self._bytes + size <= self.max_bytes:
            self._mem[key] = value
            self._bytes += size
        else:
            from safetensors.torch import save_file

            if self._dir is None:
                if self.parent is not None:
                    Path(self.parent).mkdir(parents=True, exist_ok=True)
                self._dir = tempfile.TemporaryDirectory(prefix=OFFSETS_PREFIX + owner_tag(), dir=self.parent)
            self._written += 1
            path = Path(self._dir.name) / f"{self._written:06d}.safetensors"
            save_file({"offset": value.detach().contiguous()}, str(path))
            self._files[key] = path
        self._order[key] = None

    def __getitem__(self, key: str) -> Tensor:
        if key in self._mem:
            return self._mem[key]
        if key in self._files:
            from safetensors.torch import load_file

            return load_file(str(self._files[key]))["offset"]
        raise KeyError(key)

    def _drop(self, key: str) -> None:
        if key in self._mem:
            v = self._mem.pop(key)
            self._bytes -= v.numel() * v.element_size()
        elif key in self._files:
            self._files.pop(key).unlink(missing_ok=True)
        else:
            raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        self._drop(key)
        del self._order[key]

    def __iter__(self):
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    @property
    def spilled(self) -> int:
        """Layers kept on disk."""
        return len(self._files)

    def close(self) -> None:
        """Remove the spilled files (the in-memory offsets stay)."""
        for k in list(self._files):
            del self[k]
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def default_offset_budget(pipe) -> int | None:
    """How many bytes of offsets a merge keeps in memory: what is left of half the machine's memory after
    the model's weights (SD 1.5 in fp32 on a 16 GB machine: ~3.8 GB, more than all its offsets; SDXL in fp32 on
    23 GB: none, so ~7.5 GB of offsets wait on disk). None (everything in memory) where the memory size is
    unknown."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep everything in memory
        return None
    weights = sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                  for p in c.parameters())
    return max(0, ram // 2 - weights)


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
        rep = dict(_jsonable(res.report))
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
    from loraclr.io.checkpoint import fuse_deltas

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
        from loraclr.pipeline import Model

        return Model(self.pipe, self.table, {c.name: c.trigger for c in self.concepts})


def merge_model(recipe: Recipe, *, progress: bool = True, spill_parent: str | Path | None = None,
                offsets_max_bytes: int | None | str = "auto") -> MergedModel:
    """Load the base and the recipe's LoRAs, collect features and solve stage by stage (module docstring);
    nothing is written (spilled features go to a temporary folder under ``spill_parent``, then are removed).
    Offsets beyond ``offsets_max_bytes`` are kept on disk there as well (:class:`OffsetStore`; "auto":
    :func:`default_offset_budget`, None: all in memory). :func:`merge` writes the result; benchmarks use this
    directly."""
    from loraclr.io import load_embeddings, load_lora
    from loraclr.merge.methods import get_method, make_config
    from loraclr.pipeline import family_of, load_base

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
        return _write(recipe, out_dir, m, inputs)
    finally:
        if isinstance(m.offsets, OffsetStore):
            m.offsets.close()


def _write(recipe: Recipe, out_dir: Path, m: MergedModel, inputs: list[str]) -> MergeSummary:
    from loraclr.io.safe import atomic_write

    timings, config, concepts = m.timings, m.config, m.concepts
    method = recipe.method.name

    t = time.perf_counter()
    summary = MergeSummary(out_dir=out_dir, method=method, family=m.family, n_concepts=len(concepts),
                           n_layers=len(m.offsets))
    summary.fidelity = _fidelity_summary(m.reports, [c.name for c in concepts])
    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        files = _export(tmp, recipe, m.pipe, m.family, m.offsets, m.table, concepts, inputs, summary)
        report = {
            "method": method,
            "config": _jsonable(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else str(config),
            "family": m.family,
            "concepts": [c.name for c in concepts],
            "fidelity": summary.fidelity,
            "lora_export": summary.lora_errors,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "layers": m.reports,
        }
        timings["export"] = time.perf_counter() - t
        report["timings_s"]["export"] = round(timings["export"], 3)
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        files.append("report.json")
    summary.timings = timings
    summary.files = files
    log.info("merged %d concepts (%d layers) with %s into %s in %.1f s", len(concepts), len(m.offsets), method,
             out_dir, sum(timings.values()))
    return summary


def _fidelity_summary(reports: dict[str, dict], names: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        merged = [r["fidelity"]["merged"][i] for r in reports.values() if "fidelity" in r]
        summed = [r["fidelity"]["sum"][i] for r in reports.values() if "fidelity" in r]
        if merged:
            out[name] = {"merged": sum(merged) / len(merged), "sum": sum(summed) / len(summed),
                         "layers": len(merged)}
    return out


def _export(tmp: Path, recipe: Recipe, pipe, family: str, offsets: Mapping[str, Tensor], table: TokenTable,
            concepts: list[ConceptFeaturesInput], inputs: list[str], summary: MergeSummary) -> list[str]:
    from loraclr.io import factorize, save_embeddings, save_lora

    files: list[str] = []
    out = recipe.output
    manifest: dict[str, Any] = {"format": "loraclr-merge", "version": 1, "family": family,
                                "method": recipe.method.name, "prompts": "prompts.json"}
    if out.pipeline:
        pipe.save_pretrained(str(tmp / "pipeline"), safe_serialization=True)
        manifest["pipeline"] = "pipeline"
        files.append("pipeline")
    if out.single_file:
        from loraclr.io.checkpoint import save_single_file

        save_single_file(pipe, tmp / "merged.safetensors")
        manifest["single_file"] = "merged.safetensors"
        files.append("merged.safetensors")
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
        name = f"merged_lora_{fmt}.safetensors"
        save_lora(factors, tmp / name, format=fmt, family=family, merged_from=[c.lora for c in recipe.concepts],
                  metadata={"loraclr.method": recipe.method.name}, unet_config=dict(pipe.unet.config))
        summary.lora_errors[fmt] = {"max_rel_error": max(errs), "mean_rel_error": sum(errs) / len(errs),
                                    "max_rank": max(f.rank for f in factors.values())}
        manifest["loras"][fmt] = name
        files.append(name)
    if table.tokens:
        save_embeddings(table.learned_tokens(), tmp / "embeddings", "a1111")
        manifest["embeddings"] = "embeddings"
        files.append("embeddings")
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
    (tmp / "prompts.json").write_text(json.dumps(prompt_map, indent=1))
    files.append("prompts.json")
    recipe_text = dump_recipe(recipe)
    import yaml

    recipe_text += yaml.safe_dump({"versions": package_versions()}, sort_keys=False)
    (tmp / "recipe.yaml").write_text(recipe_text)
    files.append("recipe.yaml")
    manifest["inputs"] = inputs
    (tmp / "loraclr.json").write_text(json.dumps(manifest, indent=1))
    files.append("loraclr.json")
    return files
