"""Merge recipes: what to merge, how, and what to write. Frozen dataclasses validated on load.

Two input forms are accepted:

* a YAML (or JSON) mapping::

      base: path/to/diffusers-folder | path/to/model.safetensors | mini
      method: loraclr                  # its registry preset; or {name: loraclr, mode: paper, ...settings}
      concepts:
        - name: alice
          lora: loras/alice.safetensors
          trigger: "sks woman"         # words in the prompts; optional when the file carries learned tokens
          prompts: ["photo of a {trigger}", "{trigger}"]     # the default
          unet_strength: 1.0
          text_encoder_strength: 1.0
      features: {steps: 5, spatial_prompts: 2, resolution: null, max_resolution: 256, seed: 0, max_rows: 2048}
      output: {pipeline: true, lora_formats: [kohya, diffusers], rank: 64}
      executor: local                  # or {kind: ray, address: local | auto | host:port, workers: 2}

* the official LoRACLR concept JSON list ``[{lora_path, unet_alpha, text_encoder_alpha, concept_name}]``;
  ``concept_name`` (e.g. ``"<elsa1> <elsa2>"``) becomes the trigger, and the base model must be given on the
  command line (``--base``) or via :meth:`Recipe.replace`.

Relative paths are resolved against the recipe file's folder. Every error names the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraclr.executors import EXECUTORS
from loraclr.merge.api import all_methods, resolve_settings

DEFAULT_PROMPTS = ("photo of a {trigger}", "{trigger}")  # the official code's two templates
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
LORA_FORMATS = ("kohya", "diffusers")
CROSS_ATTENTION_ROWS = ("trigger", "prompt", "padded")


@dataclass(frozen=True)
class BaseModel:
    """The base model: a diffusers folder, a single-file checkpoint, or the built-in ``mini``.

    config: for single-file checkpoints, a diffusers folder whose configs describe the checkpoint (needed
        offline, since diffusers otherwise fetches them from the Hub).
    """

    path: str
    config: str | None = None

    @property
    def is_mini(self) -> bool:
        return self.path == "mini"


@dataclass(frozen=True)
class Concept:
    """One concept LoRA and how it is called.

    trigger: the words that call the concept (``"sks woman"``) or its learned tokens (``"<elsa1> <elsa2>"``,
        names as stored in the file). Empty: the learned tokens of the file, in file order.
    prompts: feature-collection prompts; ``{trigger}`` is replaced by the trigger. Empty: the default.
    embeddings: optional separate embedding file (textual inversion) used with the LoRA.
    """

    name: str
    lora: str
    trigger: str = ""
    prompts: tuple[str, ...] = ()
    unet_strength: float = 1.0
    text_encoder_strength: float = 1.0
    embeddings: str | None = None

    @property
    def prompt_templates(self) -> tuple[str, ...]:
        return self.prompts or DEFAULT_PROMPTS


@dataclass(frozen=True)
class FeatureSettings:
    """How features are collected (the merge's stages: :mod:`loraclr.merging`). Defaults are chosen for a
    CPU; bench/RESULTS.md has the measurements behind them.

    steps: sampling steps of the per-concept run for the spatial UNet layers (official: 20 DPM-Solver steps;
        every step is recorded). 5 by default, with ``spatial_prompts`` 2: the same UNet forwards as the
        official single prompt at 10 steps, spent on two layouts instead of finer steps, which kept more
        identity in the benchmark. Rows beyond ``max_rows`` are subsampled anyway, so more steps mostly cost
        time.
    resolution: image side in pixels for that run; None = the model's native size (unet sample_size x VAE
        scale factor: 512 for SD 1.5, as the official code) capped at ``max_resolution``.
    max_resolution: cap on that native size (None: no cap, the official setting). 256 by default, because
        the spatial run costs concepts x steps UNet forwards, and a forward's cost grows with the pixels. The
        trade-off: features below the native resolution are a proxy. Every layer still sees the concept's
        prompt through its own LoRA, but on a smaller latent, where self-attention mixes fewer positions and
        the model is off its training distribution, so the input statistics X_i differ from those of a
        native-size generation. Set ``max_resolution: null`` (or ``resolution``) for the native size where
        time allows, e.g. on a GPU. A no-op below the cap (the miniature world: 64 px).
    seed: seed of the sampling run's initial noise (the official code is unseeded).
    precision: dtype of the sampling run: "auto" (default) autocasts to bf16 where the machine running it
        computes bf16 natively (a CPU with AVX512-BF16 or AMX, a CUDA device with bf16) and runs fp32
        elsewhere (:func:`loraclr.runtime.choose_precision`); "float32", "bfloat16" and "float16" force one.
        Rows are stored in fp32 either way. Why auto: on such CPUs an SD-sized UNet forward takes about 0.6x
        its fp32 time, with the same quality benchmark row; without those instructions bf16 is emulated and
        far slower. On the miniature world's small model bf16 is slightly slower than fp32.
    max_rows: cap on the rows kept per layer per concept (deterministic subsample, same positions for every
        concept so blocks stay aligned); 0 = keep all.
    gram: also accumulate the exact fp32 statistics X^T X over *all* rows (memory: d_in^2 per layer and
        concept), for methods that can use them.
    spatial_prompts: how many of the concept's prompts drive the sampling run (official: 1; default 2, see
        ``steps``: more varied rows for the spatial layers, the layers where merging loses identity).
    cross_attention_rows: which encoder-state rows feed the cross-attention to_k / to_v merge: "trigger"
        (official: the trigger's tokens + end-of-text), "prompt" (every unpadded token) or "padded" (every
        position the UNet attends to at inference, padding included; the default).
    text_encoder_rows: rows of the text-encoder merge: "prompt" (official: every unpadded token) or
        "padded" (every position, padding included; the default).
        Why not the official rows by default: the UNet attends to all 77 positions, and a solve that never
        saw the padding positions leaves them unconstrained; with padded rows the merged model's noise
        prediction is closer to each concept's own model than the naive sum (tests/test_merge_cli.py), with
        the official rows it is not. Use "prompt" / "trigger" for the paper's recipe.
    """

    steps: int = 5
    resolution: int | None = None
    max_resolution: int | None = 256
    seed: int = 0
    precision: str = "auto"
    max_rows: int = 2048
    gram: bool = False
    spatial_prompts: int = 2
    cross_attention_rows: str = "padded"
    text_encoder_rows: str = "padded"


# Each method's preset (what a recipe naming no mode gets) lives in its registry entry
# (:class:`loraclr.merge.api.MergeMethod`); this is a read-only view of them by method name.
RECOMMENDED = {name: dict(m.preset) for name, m in all_methods().items() if m.preset}


def with_recommended(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` completed with the recommended preset of ``name`` when they name no mode."""
    return resolve_settings(name, settings)


@dataclass(frozen=True)
class MethodSpec:
    """The merge method by registry name and its settings (fields of the method's config dataclass) as the
    recipe or command line gave them; ``resolved`` adds the recommended preset where they name no mode."""

    name: str = "loraclr"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def resolved(self) -> dict[str, Any]:
        """The settings the merge uses: :func:`with_recommended` of ``settings``."""
        return with_recommended(self.name, self.settings)


@dataclass(frozen=True)
class OutputSettings:
    """What ``merge`` writes. rank: rank of the exported merged LoRA (None: the exporter's default, which
    reports the relative error); energy: alternatively keep this fraction of the spectrum."""

    pipeline: bool = True
    lora_formats: tuple[str, ...] = LORA_FORMATS
    rank: int | None = 64
    energy: float | None = None
    single_file: bool = False


@dataclass(frozen=True)
class ExecutorSettings:
    """Where the merge's feature runs and per-layer solves run (:mod:`loraclr.executors`, docs/distributed.md).

    kind: ``local`` (this process, the default) or ``ray`` (tasks on a Ray cluster).
    address (ray): ``local`` starts a Ray instance on this machine for the merge (``workers`` x
        ``cpus_per_worker`` CPUs) and stops it afterwards; ``auto`` joins the cluster that ``ray start`` runs
        here; ``host:port`` joins that cluster. A Ray session already open in this process is used as it is.
    workers (ray): worker processes; each holds the base model and every LoRA (memory: one model each).
    cpus_per_worker (ray): CPUs each worker asks for, and its torch threads (one per CPU: torch's default
        threads oversubscribe cores that processes share).
    max_retries (ray): how often a failed task is retried and a dead worker restarted before the merge gives up.
    shared_dir (ray): a folder every worker and the driver can read and write; features travel through files
        there instead of Ray's object store (None: the object store).
    """

    kind: str = "local"
    address: str = "local"
    workers: int = 2
    cpus_per_worker: int = 1
    max_retries: int = 3
    shared_dir: str | None = None


@dataclass(frozen=True)
class Recipe:
    base: BaseModel
    concepts: tuple[Concept, ...]
    method: MethodSpec = field(default_factory=MethodSpec)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    allow_pickle: bool = False
    source: str = ""  # the file it was read from (for messages)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with fields replaced; nested settings by dotted name: ``replace(**{"features.steps": 4})``."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if value is None:
                continue
            if "." in name:
                group, _, sub = name.partition(".")
                nested.setdefault(group, {})[sub] = value
            else:
                top[name] = value
        for group, subs in nested.items():
            current = top.get(group, getattr(self, group))
            if group == "method":  # method settings by name, on top of new settings if those are given too
                known = {f.name for f in dataclasses.fields(MethodSpec)}
                settings = dict(subs["settings"] if "settings" in subs else current.settings)
                settings.update({k: v for k, v in subs.items() if k not in known})
                subs = {k: v for k, v in subs.items() if k in known and k != "settings"} | {"settings": settings}
            top[group] = dataclasses.replace(current, **subs)
        out = dataclasses.replace(self, **top)
        out.validate()
        return out

    def validate(self) -> None:
        where = self.source or "recipe"
        if not self.base.path:
            raise ValueError(f"{where}: field 'base' is missing; name a diffusers folder, a checkpoint or 'mini'")
        if not self.concepts:
            raise ValueError(f"{where}: field 'concepts' is empty; list at least one concept LoRA")
        names = [c.name for c in self.concepts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{where}: concepts: duplicate names {dupes}; give each concept its own name")
        for i, c in enumerate(self.concepts):
            at = f"{where}: concepts[{i}] ({c.name})"
            if not c.lora:
                raise ValueError(f"{at}: field 'lora' is missing; give the path of the concept's LoRA file")
            for name in ("unet_strength", "text_encoder_strength"):
                v = getattr(c, name)
                if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
                    raise ValueError(f"{at}: field {name!r} must be a number, got {v!r}")
            for p in c.prompts:
                if not p.strip():
                    raise ValueError(f"{at}: field 'prompts' holds an empty prompt")
                if "{trigger}" not in p and c.trigger and c.trigger not in p:
                    raise ValueError(
                        f"{at}: prompt {p!r} contains neither '{{trigger}}' nor the trigger {c.trigger!r}; "
                        "feature collection needs the concept's words in every prompt"
                    )
        f = self.features
        if f.steps < 1:
            raise ValueError(f"{where}: features.steps must be >= 1, got {f.steps}")
        if f.resolution is not None and f.resolution < 8:
            raise ValueError(f"{where}: features.resolution must be >= 8 pixels, got {f.resolution}")
        if f.max_resolution is not None and f.max_resolution < 8:
            raise ValueError(f"{where}: features.max_resolution must be >= 8 pixels or null (no cap), "
                             f"got {f.max_resolution}")
        if f.precision not in PRECISIONS:
            raise ValueError(f"{where}: features.precision must be one of {PRECISIONS}, got {f.precision!r}")
        if f.max_rows < 0:
            raise ValueError(f"{where}: features.max_rows must be >= 0 (0 = keep all), got {f.max_rows}")
        if f.cross_attention_rows not in CROSS_ATTENTION_ROWS:
            raise ValueError(f"{where}: features.cross_attention_rows must be one of {CROSS_ATTENTION_ROWS}, "
                             f"got {f.cross_attention_rows!r}")
        if f.text_encoder_rows not in ("prompt", "padded"):
            raise ValueError(f"{where}: features.text_encoder_rows must be 'prompt' or 'padded', "
                             f"got {f.text_encoder_rows!r}")
        if f.spatial_prompts < 1:
            raise ValueError(f"{where}: features.spatial_prompts must be >= 1, got {f.spatial_prompts}")
        o = self.output
        bad = [x for x in o.lora_formats if x not in LORA_FORMATS]
        if bad:
            raise ValueError(f"{where}: output.lora_formats: unknown {bad}; choose from {LORA_FORMATS}")
        if o.rank is not None and o.rank < 1:
            raise ValueError(f"{where}: output.rank must be >= 1, got {o.rank}")
        if o.energy is not None and not 0 < o.energy <= 1:
            raise ValueError(f"{where}: output.energy must be in (0, 1], got {o.energy}")
        if not self.method.name:
            raise ValueError(f"{where}: field 'method' is empty; name a merge method")
        e = self.executor
        if e.kind not in EXECUTORS:
            raise ValueError(f"{where}: executor.kind: unknown executor {e.kind!r}; choose one of {sorted(EXECUTORS)}")
        if not isinstance(e.address, str) or not e.address:
            raise ValueError(f"{where}: executor.address must be 'local', 'auto' or host:port, got {e.address!r}")
        for name in ("workers", "cpus_per_worker"):
            v = getattr(e, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: executor.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(e.max_retries, int) or isinstance(e.max_retries, bool) or e.max_retries < 0:
            raise ValueError(f"{where}: executor.max_retries must be an integer >= 0, got {e.max_retries!r}")
        if e.shared_dir is not None and not isinstance(e.shared_dir, str):
            raise ValueError(f"{where}: executor.shared_dir must be a folder path, got {e.shared_dir!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serialisable form (the resolved recipe written beside every output)."""
        d = dataclasses.asdict(self)
        for c in d["concepts"]:
            c["prompts"] = list(c["prompts"] or DEFAULT_PROMPTS)
        d["output"]["lora_formats"] = list(d["output"]["lora_formats"])
        d["method"] = {"name": self.method.name, **self.method.resolved}  # the YAML form, preset spelled out
        d.pop("source")
        return d


# --- loading ---------------------------------------------------------------------------------------------

_TOP = {"base", "concepts", "method", "features", "output", "executor", "allow_pickle"}


def _check_keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(allowed)}")
    return obj


def _typed(value: Any, typ: type | tuple, where: str, name: str) -> Any:
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise ValueError(f"{where}: field {name!r} must be a number, got {value!r}")
    if typ is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, typ):
        names = {int: "an integer", float: "a number", (int, float): "a number", str: "a string", bool: "true or false"}
        tname = names.get(typ, str(typ))
        raise ValueError(f"{where}: field {name!r} must be {tname}, got {value!r}")
    return value


def _dataclass_from(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(data, set(fields), where)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = fields[name].default
        if value is None:
            kwargs[name] = None
            continue
        if isinstance(default, bool):
            kwargs[name] = _typed(value, bool, where, name)
        elif isinstance(default, float):
            kwargs[name] = float(_typed(value, (int, float), where, name))
        elif isinstance(default, int):
            kwargs[name] = _typed(value, int, where, name)
        elif isinstance(default, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: field {name!r} must be a list of strings, got {value!r}")
            kwargs[name] = tuple(value)
        elif isinstance(default, str):
            kwargs[name] = _typed(value, str, where, name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _resolve_path(p: str, root: Path) -> str:
    if p == "mini" or Path(p).is_absolute():
        return p
    return str((root / p).resolve())


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "concept"


def recipe_from_dict(data: Any, *, source: str = "recipe", root: str | Path = ".") -> Recipe:
    """Build and validate a recipe from parsed YAML/JSON (a mapping, or the official concept list)."""
    root = Path(root)
    if isinstance(data, list):
        return _from_official_list(data, source, root)
    data = _check_keys(data, _TOP, source)
    base = data.get("base")
    if isinstance(base, str) or base is None:
        base_model = BaseModel(path=base or "")
    else:
        base_model = _dataclass_from(BaseModel, base, f"{source}: base")
    if base_model.path:
        base_model = dataclasses.replace(base_model, path=_resolve_path(base_model.path, root))
    if base_model.config:
        base_model = dataclasses.replace(base_model, config=_resolve_path(base_model.config, root))

    raw_concepts = data.get("concepts")
    if raw_concepts is None:
        raise ValueError(f"{source}: field 'concepts' is missing; list the concept LoRAs to merge")
    if not isinstance(raw_concepts, list):
        raise ValueError(f"{source}: field 'concepts' must be a list, got {type(raw_concepts).__name__}")
    concepts = []
    for i, raw in enumerate(raw_concepts):
        where = f"{source}: concepts[{i}]"
        raw = dict(_check_keys(raw, {f.name for f in dataclasses.fields(Concept)}, where))
        if "lora" not in raw:
            raise ValueError(f"{where}: field 'lora' is missing; give the path of the concept's LoRA file")
        raw.setdefault("name", _slug(raw.get("trigger") or Path(str(raw["lora"])).stem))
        c = _dataclass_from(Concept, raw, where)
        c = dataclasses.replace(c, lora=_resolve_path(c.lora, root))
        if c.embeddings:
            c = dataclasses.replace(c, embeddings=_resolve_path(c.embeddings, root))
        concepts.append(c)

    method = data.get("method", "loraclr")
    if isinstance(method, str):
        method_spec = MethodSpec(name=method)
    elif isinstance(method, dict):
        if "name" not in method:
            raise ValueError(f"{source}: method: field 'name' is missing; e.g. {{name: loraclr, mode: paper}}")
        settings = {k: v for k, v in method.items() if k != "name"}
        method_spec = MethodSpec(name=_typed(method["name"], str, f"{source}: method", "name"), settings=settings)
    else:
        raise ValueError(f"{source}: field 'method' must be a name or a mapping, got {method!r}")

    features = _dataclass_from(FeatureSettings, data.get("features") or {}, f"{source}: features")
    output = _dataclass_from(OutputSettings, data.get("output") or {}, f"{source}: output")
    executor = data.get("executor") or {}
    if isinstance(executor, str):  # `executor: ray`
        executor = {"kind": executor}
    executor = _dataclass_from(ExecutorSettings, executor, f"{source}: executor")
    if executor.shared_dir:
        executor = dataclasses.replace(executor, shared_dir=_resolve_path(executor.shared_dir, root))
    allow_pickle = _typed(data.get("allow_pickle", False), bool, source, "allow_pickle")
    recipe = Recipe(
        base=base_model, concepts=tuple(concepts), method=method_spec, features=features, output=output,
        executor=executor, allow_pickle=allow_pickle, source=source,
    )
    if recipe.base.path:  # the official list has no base; load_recipe's caller supplies it
        recipe.validate()
    return recipe


def _from_official_list(items: list, source: str, root: Path) -> Recipe:
    concepts = []
    keys = {"lora_path", "unet_alpha", "text_encoder_alpha", "concept_name"}
    for i, item in enumerate(items):
        where = f"{source}: [{i}]"
        _check_keys(item, keys, where)
        for k in ("lora_path", "concept_name"):
            if k not in item:
                raise ValueError(f"{where}: field {k!r} is missing (official format: {sorted(keys)})")
        name = _typed(item["concept_name"], str, where, "concept_name")
        concepts.append(
            Concept(
                name=_slug(name),
                lora=_resolve_path(_typed(item["lora_path"], str, where, "lora_path"), root),
                trigger=name,
                unet_strength=float(_typed(item.get("unet_alpha", 1.0), (int, float), where, "unet_alpha")),
                text_encoder_strength=float(
                    _typed(item.get("text_encoder_alpha", 1.0), (int, float), where, "text_encoder_alpha")
                ),
            )
        )
    # Official ED-LoRA files are torch pickles; the official list implies the user trusts them.
    return Recipe(base=BaseModel(path=""), concepts=tuple(concepts), allow_pickle=True, source=source)


def load_recipe(path: str | Path, *, base: str | None = None) -> Recipe:
    """Read a YAML / JSON recipe (or the official concept JSON list) and validate it.

    base: overrides (or, for the official list, supplies) the base model.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from e
    if data is None:
        raise ValueError(f"{path}: the recipe is empty")
    recipe = recipe_from_dict(data, source=str(path), root=path.parent)
    if base is not None:
        recipe = dataclasses.replace(recipe, base=BaseModel(path=_resolve_path(base, Path.cwd())))
    recipe.validate()
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
