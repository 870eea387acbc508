"""What the page's buttons do, without the page: inspect files, merge, reopen a merge, generate, save, evaluate.

Each runs the same library function or command as the CLI, so the page's numbers and images are the CLI's
for the same settings: a merge and an evaluation run the command itself (:func:`loraclr.ui.jobs.run_command`),
generation parses the same argument list as ``loraclr generate`` and calls its
:func:`~loraclr.commands.generate.build_request`. The page shows the equivalent command beside each result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraclr.cli import build_parser
from loraclr.ui.boxes import region_arguments
from loraclr.ui.folders import IMAGES, MERGES, RECIPES, SCORES, UPLOADS, Folders, display
from loraclr.ui.jobs import Job, error_message, run_command

log = logging.getLogger(__name__)

DEFAULT_BASE = "mini"
# the two look-alike characters the page starts with (the demo's round red group: merging has work to do)
DEFAULT_CONCEPTS = ("rubo", "rika")
# settings of the first image a newcomer draws: small enough for seconds on a CPU
DEFAULT_STEPS, DEFAULT_SEEDS, DEFAULT_GUIDANCE = 20, 2, 7.5
DEFAULT_BOXES = ((0.0, 0.25, 0.5, 1.0), (0.5, 0.25, 1.0, 1.0))  # left and right half, as in docs/regions.md
CONCEPT_COLUMNS = ["name", "trigger", "strength", "file", "format", "family", "rank", "learned tokens"]


@dataclass(frozen=True)
class Settings:
    """How the page was started: the folders it may use, pickles, threads for child commands."""

    folders: Folders
    allow_pickle: bool = False
    threads: int | None = None

    def child_flags(self, command: str) -> list[str]:
        flags = ["--threads", str(self.threads)] if self.threads is not None else []
        if self.allow_pickle and command in ("merge", "evaluate", "generate"):
            flags.append("--allow-pickle")
        return flags


# diffusers resolves these on first use through a lazy module, which is not safe when two request threads
# touch it at once (one of them gets an AttributeError): the page resolves them before serving.
DIFFUSERS_CLASSES = ("DiffusionPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "ControlNetModel",
                     "T2IAdapter", "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline",
                     "StableDiffusionAdapterPipeline", "StableDiffusionXLAdapterPipeline", "UNet2DConditionModel")


def preload() -> None:
    """Import what the page's work uses, once, before requests arrive in parallel threads."""
    import diffusers

    import loraclr.commands.generate
    import loraclr.commands.inspect
    import loraclr.merging
    import loraclr.pipeline
    import loraclr.structure  # noqa: F401

    for name in DIFFUSERS_CLASSES:
        getattr(diffusers, name)


# --- concepts -----------------------------------------------------------------------------------------------


def world_specs() -> dict[str, Any]:
    """The shipped concepts of the miniature world by file name (empty when the world is not built)."""
    from loraclr.evaluate.concepts import WORLD_MANIFEST, load_manifest

    if not WORLD_MANIFEST.is_file():
        return {}
    return {Path(s.file).name: s for s in load_manifest(WORLD_MANIFEST) if s.file is not None}


def describe(settings: Settings, path: Path) -> dict[str, Any]:
    """``loraclr inspect``'s description of one file (format, family, ranks, triggers, learned tokens)."""
    from loraclr.commands.inspect import summarize

    return summarize(str(path), allow_pickle=settings.allow_pickle)


def concept_row(settings: Settings, path: Path) -> tuple[list, str | None]:
    """A row of the concept table for a LoRA file, and the inspect error line if it cannot be read.

    The trigger is the world manifest's for a shipped concept, else the file's learned tokens, else its first
    trigger word: the words its LoRA answers to, which the user can edit."""
    path = settings.folders.resolve(path)
    try:
        info = describe(settings, path)
    except Exception as e:  # an unreadable file is listed with the reason, not fatal to the page
        return [path.stem, "", 1.0, display(path), "?", "?", "", ""], error_message("inspect", e)
    spec = world_specs().get(path.name) if path.parent == _world_concepts() else None
    tokens = [t["name"] for t in info["learned_tokens"]]
    trigger = spec.trigger if spec else " ".join(tokens) or (info["trigger_words"] or [""])[0]
    ranks = sorted({r for b in info["blocks"].values() for r in b["rank"]})
    return [path.stem, trigger, 1.0, display(path), info["format"], info["family"],
            ",".join(map(str, ranks)), " ".join(tokens)], None


def _world_concepts() -> Path:
    from loraclr.evaluate.concepts import WORLD_MANIFEST

    return WORLD_MANIFEST.parent.resolve()


def default_folder() -> str:
    return display(_world_concepts())


def store_upload(settings: Settings, uploaded: str | Path) -> Path:
    """Copy an uploaded file (already size-checked by the server) into the work folder's uploads."""
    import shutil

    from loraclr.io.safe import atomic_write
    from loraclr.ui.folders import LORA_SUFFIXES

    src = Path(uploaded)
    if src.suffix.lower() not in LORA_SUFFIXES:
        raise ValueError(f"{src.name}: not a LoRA file; expected one of {', '.join(LORA_SUFFIXES)}")
    dest = settings.folders.output(UPLOADS, src.name)
    with atomic_write(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


# --- merge --------------------------------------------------------------------------------------------------


def method_choices() -> list[tuple[str, str]]:
    from loraclr.merge.api import all_methods

    methods = sorted(all_methods().values(), key=lambda m: m.name != "loraclr")  # the project's method first
    return [(f"{m.name}: {m.summary}", m.name) for m in methods]


def method_defaults(name: str) -> dict[str, Any]:
    """The settings a recipe naming only ``name`` gets: the config's defaults under the method's preset."""
    from loraclr.merge.api import get_method

    m = get_method(name)
    defaults = {f.name: f.default for f in dataclasses.fields(m.config_cls)
                if f.default is not dataclasses.MISSING and f.name not in ("device", "dtype")}
    return {**defaults, **m.preset}


def settings_rows(name: str) -> list[list]:
    return [[k, _yaml_text(v)] for k, v in method_defaults(name).items()]


def _yaml_text(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def changed_settings(name: str, rows: Any) -> dict[str, Any]:
    """The settings the user changed from the ones shown (values parsed as YAML, like ``--set``). With a new
    ``mode``, the recipe starts from the config's defaults, so every shown value that differs from those
    goes in too (else the preset's values the user saw would be lost)."""
    from loraclr.merge.api import get_method

    shown = method_defaults(name)
    values = {}
    for row in rows or []:
        key, text = str(row[0]).strip(), str(row[1]).strip()
        if not key:
            continue
        try:
            values[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise ValueError(f"method setting {key}: {text!r} is not a value") from None
    changed = {k: v for k, v in values.items() if k not in shown or v != shown[k]}
    if "mode" in changed:
        config_defaults = {f.name: f.default for f in dataclasses.fields(get_method(name).config_cls)}
        changed = {k: v for k, v in values.items() if k == "mode" or v != config_defaults.get(k)}
    return changed


def recipe_dict(settings: Settings, concepts: Any, method: str, method_rows: Any, *, base: str = DEFAULT_BASE,
                feature_steps: int | None = None, rank: int | None = None) -> dict[str, Any]:
    """The recipe of the page's merge (what ``loraclr merge`` reads), from the concept table."""
    specs = world_specs()
    items = []
    for row in concepts or []:
        name, trigger, strength, file = (str(row[0]).strip(), str(row[1]).strip(), row[2], str(row[3]).strip())
        if not name and not file:
            continue
        path = settings.folders.resolve(file)
        item: dict[str, Any] = {"name": name, "lora": str(path)}
        if trigger:
            item["trigger"] = trigger
        try:
            s = float(strength)
        except (TypeError, ValueError):
            raise ValueError(f"concept {name}: strength {strength!r} is not a number") from None
        if s != 1.0:
            item["unet_strength"] = item["text_encoder_strength"] = s
        spec = specs.get(path.name) if path.parent == _world_concepts() else None
        if spec is not None:  # the words the world's LoRAs were trained with, as the demo's recipe
            item["prompts"] = [spec.prompt_phrase("{trigger}"), "{trigger}"]
        items.append(item)
    out: dict[str, Any] = {"base": base, "method": {"name": method, **changed_settings(method, method_rows)},
                           "concepts": items}
    if settings.allow_pickle:
        out["allow_pickle"] = True
    if feature_steps is not None:
        out["features"] = {"steps": int(feature_steps)}
    if rank is not None:
        out["output"] = {"rank": int(rank)}
    return out


@dataclass
class MergePlan:
    """A merge ready to start: where its recipe is written and the command line that runs it."""

    recipe: dict[str, Any]
    recipe_path: Path
    out_dir: Path
    argv: list[str]

    @property
    def command(self) -> str:
        return "loraclr " + shlex.join(self.argv)


def plan_merge(settings: Settings, recipe: dict[str, Any], name: str, overwrite: bool = False) -> MergePlan:
    out_dir = settings.folders.output(MERGES, name)
    recipe_path = settings.folders.output(RECIPES, f"{name}.yaml")
    argv = ["merge", display(recipe_path), "-o", display(out_dir), *settings.child_flags("merge")]
    if overwrite:
        argv.append("--overwrite")
    return MergePlan(recipe, recipe_path, out_dir, argv)


def run_merge(job: Job, plan: MergePlan) -> MergeView:
    """The merge command in a child process (cancel: its Ctrl-C); the finished merge, reopened."""
    from loraclr.io.safe import atomic_write

    job.report("writing the recipe")
    with atomic_write(plan.recipe_path) as tmp:
        tmp.write_text(yaml.safe_dump(plan.recipe, sort_keys=False), encoding="utf-8")
    job.report("starting the merge command")
    printed = run_command(job, plan.argv)
    job.report("done", 1.0)
    view = open_merge(plan.out_dir)
    view.printed = json.loads(printed)
    view.summary = view.printed  # the command's own numbers (report.json keeps timings to 3 places, not 2)
    return view


@dataclass
class MergeView:
    """A finished merge as the page shows it."""

    path: Path
    summary: dict[str, Any]  # what `loraclr merge` prints
    report: dict[str, Any]
    recipe_text: str
    files: dict[str, Path]  # download label -> file
    base: str
    concepts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> trigger, lora, strengths
    printed: dict[str, Any] | None = None  # what the merge command printed, when the page ran it

    def insert_text(self, name: str) -> str:
        """What the concept picker writes: the words the concept's LoRA was trained with (its first feature
        prompt, e.g. the world's "a <rubo1> <rubo2> <rubo3> creature") or, for the generic template, its
        trigger. Triggers are the original ones, which both the merged model and naive stacking read."""
        c = self.concepts[name]
        template = c["prompts"][0] if c["prompts"] else "{trigger}"
        if template.startswith("photo of a {trigger}") or "{trigger}" not in template:
            return c["trigger"]
        return template.replace("{trigger}", c["trigger"])

    def markdown(self) -> str:
        s, r = self.summary, self.report
        lines = [f"**{self.path.name}**: `{s['method']}` merge of {', '.join(self.concepts)} "
                 f"({s['layers']} layers, {sum(s['timings_s'].values()):.1f} s)", "",
                 "| concept | error of the merge | error of naive stacking |", "|---|---|---|"]
        for name, d in s["fidelity"].items():
            lines.append(f"| {name} | {d['merged']:.4f} | {d['sum']:.4f} |")
        lines += ["", "Error: the layers' mean relative output error on each concept's own features "
                      "(lower is better; naive stacking is the sum of the LoRAs).", "",
                  "Phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in s["timings_s"].items())]
        if r.get("config"):
            shown = {k: v for k, v in r["config"].items() if k not in ("device", "dtype")}
            lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in shown.items())]
        return "\n".join(lines)


def merge_summary(report: dict[str, Any], out: str) -> dict[str, Any]:
    """The summary ``loraclr merge`` prints, from a finished merge's report.json (same rounding; a timing can
    differ in its last digit, as report.json holds it rounded to 3 places already)."""
    return {
        "out": out, "method": report["method"], "layers": len(report.get("layers", {})),
        "timings_s": {k: round(v, 2) for k, v in report.get("timings_s", {}).items()},
        "fidelity": {k: {m: round(v, 4) for m, v in d.items()} for k, d in report.get("fidelity", {}).items()},
    }


def open_merge(path: str | Path, folders: Folders | None = None) -> MergeView:
    """Reopen a finished merge: its report, recipe, downloads and concepts."""
    from loraclr.export import MANIFEST, PROMPTS
    from loraclr.pipeline import is_merged_output

    p = folders.resolve(path) if folders is not None else Path(path)
    if not is_merged_output(p):
        raise FileNotFoundError(f"{path}: not a finished merge (no {MANIFEST}); pick a folder `loraclr merge` wrote")
    manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    report = json.loads((p / "report.json").read_text(encoding="utf-8"))
    recipe_text = (p / "recipe.yaml").read_text(encoding="utf-8")
    recipe = yaml.safe_load(recipe_text)
    prompts = json.loads((p / manifest.get("prompts", PROMPTS)).read_text(encoding="utf-8"))
    files = {f"merged LoRA ({fmt})": p / name for fmt, name in manifest.get("loras", {}).items()}
    files["recipe (resolved)"] = p / "recipe.yaml"
    concepts = {}
    for c in recipe.get("concepts", []):
        info = prompts.get("concepts", {}).get(c["name"], {})
        concepts[c["name"]] = {"trigger": info.get("original_trigger") or c.get("trigger", ""),
                               "prompts": c.get("prompts") or [], "lora": c["lora"],
                               "unet_strength": c.get("unet_strength", 1.0),
                               "text_encoder_strength": c.get("text_encoder_strength", 1.0)}
    base = recipe.get("base", {})
    return MergeView(p, merge_summary(report, display(p)), report, recipe_text,
                     {k: v for k, v in files.items() if v.is_file()},
                     base.get("path", DEFAULT_BASE) if isinstance(base, dict) else str(base), concepts)


def list_merges(folders: Folders) -> list[str]:
    """Finished merges in the work folder's merges, newest first."""
    from loraclr.pipeline import is_merged_output

    root = folders.work / MERGES
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_merged_output(p)]
    return [display(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


# --- compose / generate --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compose:
    """The Compose tab's inputs."""

    model: str  # a merge folder
    prompt: str
    regions: tuple = ()  # rows [x0, y0, x1, y1, prompt]
    negative: str = ""
    mode: str = "attention"
    start: float | None = None
    seeds: int = DEFAULT_SEEDS
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    layout: bool = False  # the miniature world's layout adapter (a character in each box)
    naive: bool = False  # also draw naive stacking of the merge's LoRAs, side by side


def generate_argvs(settings: Settings, c: Compose) -> dict[str, list[str]]:
    """``loraclr generate`` argument lists, by column: the merged model and, if asked, naive stacking (the
    base with the merge's LoRAs summed; ``{concept}`` placeholders written out, as it knows no concepts)."""
    model = settings.folders.resolve(c.model)
    view = open_merge(model)
    shared = ["-n", str(c.seeds), "--seed", str(c.seed), "--steps", str(c.steps), "--guidance", f"{c.guidance:g}"]
    if c.negative.strip():
        shared += ["--negative", c.negative]
    regions = region_arguments(c.regions)
    if regions:
        shared += ["--region-mode", c.mode]
        if c.start is not None:
            shared += ["--region-start", f"{c.start:g}"]
        if c.layout:
            shared += ["--structure", "layout"]
    out = {"merged": ["generate", display(model), c.prompt, *regions, *shared]}
    if c.naive:
        def spelled(text: str) -> str:
            for name, info in view.concepts.items():
                text = text.replace("{" + name + "}", info["trigger"])
            return text

        base = view.base if view.base == "mini" else display(settings.folders.resolve(view.base))
        loras = []
        for name, info in view.concepts.items():
            settings.folders.resolve(info["lora"])  # a merge made elsewhere may name files outside the folders
            if info["unet_strength"] != info["text_encoder_strength"]:
                log.warning("naive stacking of %s uses its unet strength %s for the whole LoRA", name,
                            info["unet_strength"])
            loras += ["--lora", f"{display(info['lora'])}:{info['unet_strength']:g}"]
        out["naive"] = ["generate", base, spelled(c.prompt), *loras,
                        *[spelled(a) for a in regions], *shared]
    return out


def with_output(argv: list[str], out: Path, settings: Settings) -> list[str]:
    return [*argv, *settings.child_flags("generate"), "-o", display(out)]


class ModelCache:
    """The last few loaded models, so that a second click does not load again (keyed by what was loaded and
    the merge's files' times: an overwritten merge is loaded afresh)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._models: dict[tuple, Any] = {}

    def get(self, request, precision=None):
        from loraclr.pipeline import is_merged_output

        stamp = (Path(request.model) / "loraclr.json").stat().st_mtime_ns if is_merged_output(request.model) else 0
        key = (str(request.model), tuple(request.loras), request.allow_pickle, request.base_config, stamp,
               str(precision))
        if key not in self._models:
            model = request.load(precision)
            while len(self._models) >= self.size:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model
        return self._models[key]


@dataclass
class Generated:
    """Images by column (merged, naive), each column's command, the settings."""

    images: dict[str, list]
    commands: dict[str, list[str]]
    compose: Compose
    seconds: float


def run_generate(job: Job, settings: Settings, compose: Compose, cache: ModelCache,
                 out: Path | None = None) -> Generated:
    """Every column's ``loraclr generate`` command, parsed and run in this process (the model stays loaded);
    the job's flag is checked before every UNet call, so cancel stops within a step and nothing is saved."""
    from loraclr.commands.generate import build_request
    from loraclr.pipeline import generate

    t = time.perf_counter()
    argvs = generate_argvs(settings, compose)
    out = out or settings.folders.work / IMAGES / "unsaved"
    commands = {k: with_output(v, out / k, settings) for k, v in argvs.items()}
    requests = {k: build_request(build_parser(v).parse_args(v)) for k, v in commands.items()}  # all checks first
    images: dict[str, list] = {}
    for k, (column, request) in enumerate(requests.items()):
        job.report(f"loading the {column} model", k / len(requests))
        model = cache.get(request)
        total = request.options["n"] * request.options["steps"] * len(request.prompts)
        calls = [0]

        def step(module, args, column=column, k=k, total=total, calls=calls):
            job.check()
            calls[0] += 1
            done = min(calls[0] / total, 1.0)
            job.report(f"drawing ({column})", (k + done) / len(requests))

        hook = model.pipe.unet.register_forward_pre_hook(step)
        try:
            images[column] = generate(model, request.prompts, progress=False, **request.options)
        finally:
            hook.remove()
    return Generated(images, commands, compose, time.perf_counter() - t)


def save_generated(settings: Settings, result: Generated) -> Path:
    """The images as ``loraclr generate -o`` names them, one folder per column, with ``settings.json`` (the
    settings and the commands that draw the same images); written atomically under the work folder."""
    from PIL.PngImagePlugin import PngInfo

    from loraclr.io.safe import atomic_write

    name = time.strftime("%Y%m%d-%H%M%S")
    dest = settings.folders.output(IMAGES, name)
    n = result.compose.seeds
    with atomic_write(dest) as tmp:
        tmp.mkdir()
        commands = {}
        for column, images in result.images.items():
            argv = [*result.commands[column][:-1], display(dest / column)]  # -o is the last argument
            commands[column] = "loraclr " + shlex.join(argv)
            (tmp / column).mkdir()
            for idx, image in enumerate(images):
                meta = PngInfo()
                meta.add_text("parameters", commands[column])
                image.save(tmp / column / f"{idx // n:03d}-{idx % n}.png", pnginfo=meta)
        info = {"settings": dataclasses.asdict(result.compose), "commands": commands,
                "seconds": round(result.seconds, 2)}
        (tmp / "settings.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return dest


# --- evaluate -----------------------------------------------------------------------------------------------


def plan_evaluate(settings: Settings, model: str, suite: str = "single", prompts: int = 1, seeds: int = 2,
                  steps: int = DEFAULT_STEPS) -> tuple[list[str], Path]:
    view = open_merge(model, settings.folders)
    out = settings.folders.output(SCORES, f"{view.path.name}-{suite}-{time.strftime('%Y%m%d-%H%M%S')}.md")
    argv = ["evaluate", display(view.path), "--suite", suite, "--concepts", ",".join(view.concepts),
            "--prompts", str(prompts), "--seeds", str(seeds), "--pairs", "1", "--triples", "0",
            "--steps", str(steps), "--md", display(out), *settings.child_flags("evaluate")]
    return argv, out


def run_evaluate(job: Job, argv: list[str], out: Path) -> str:
    run_command(job, argv)
    return out.read_text(encoding="utf-8")
