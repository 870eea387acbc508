"""The demo (``loraclr demo``): merge, draw and score a few look-alike concepts of the built-in miniature world.

What it does, in order (everything below the output folder, written atomically):
1. concepts: the shipped concept LoRAs of the world (``world/assets/concepts/manifest.json``) when they
   exist; otherwise *quick LoRAs*: a small default set trained here with the project's trainer (few steps,
   seeded), cached under ``cache/quick-loras`` in the output folder and reused by ``--overwrite`` runs whose
   settings and base model match. Quick LoRAs are marked as such in the output and in the table;
2. merges: each requested method (LoRACLR by default) through :func:`loraclr.merging.merge`, into
   ``merged-<method>/`` (a normal merge output: ``loraclr generate`` reads it);
3. images and metrics: the single-concept suite with each concept's own LoRA (the reference), the single-
   and multi-concept suites with naive LoRA stacking (the sum of deltas) and with every merged model,
   scored by :mod:`loraclr.evaluate` (text / image / identity alignment);
4. ``grid.png`` (rows = prompts, columns = single LoRA / naive stack / merged models, labelled),
   ``metrics.md`` and ``metrics.json`` (one row per model), ``demo.json`` (settings, notes, timings).

When the world's evaluators are not built yet, images and the grid are still made and the table says that
metrics were skipped. A missing base model raises the ``FileNotFoundError`` of
:func:`loraclr.world.model.base_model_path`.

Budget, in CPU seconds (what one quiet core takes): a quick-LoRA step (batch 8, mini SD) ~0.5, a 64 px image
with 20 DDIM steps and guidance ~0.8, a LoRACLR merge of 3 concepts ~3.4, loading a model ~1. The whole default
demo with quick LoRAs (3 x 100 steps, 52 scored images) takes about 4 CPU minutes, most of it training; with the
shipped LoRAs there is no training and the suites are larger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraclr.merge.api import get_method

log = logging.getLogger(__name__)

# The round red group of the world (scenes.CONCEPTS): same body shape and colour, told apart only by
# pattern, face and accessory, so stacking their LoRAs interferes and merging has something to fix.
DEFAULT_CONCEPTS = ("rubo", "rika", "rono")
# how the demo's multi-concept rows are drawn (docs/regions.md has the measurements behind the choice)
DEMO_REGIONS = "attention"
DEMO_STRUCTURE: str | None = "auto"  # auto: the world's layout adapter on the world's base, none elsewhere

SINGLE, NAIVE = "single", "naive"
# Suite sizes by measurement (module docstring): with quick LoRAs, training takes ~170 of ~230 CPU s, so the
# suites stay small (52 images); shipped LoRAs leave the time to more images (132) for tighter intervals.
SUITES_QUICK = {"n_prompts": 2, "seeds": 2}
SUITES_SHIPPED = {"n_prompts": 4, "seeds": 3}
COLUMN_LABELS = {SINGLE: "single LoRA", NAIVE: "naive stack"}

# Grid layout (pixels): the label column on the left, a header row, square cells, a footer line.
CELL = 128
LABEL_WIDTH = 232
HEADER_HEIGHT = 34
FOOTER_HEIGHT = 22


@dataclass(frozen=True)
class QuickLoras:
    """The LoRAs the demo trains when the shipped concepts are missing (sized for the 5-minute budget:
    3 x 100 steps ~ 140 CPU s measured, see the module docstring)."""

    concepts: tuple[str, ...] = DEFAULT_CONCEPTS
    steps: int = 100
    n_images: int = 32
    batch: int = 8
    rank: int = 4
    alpha: float = 4.0
    lr: float = 1e-3
    text_lr: float = 5e-4
    targets: str = "kohya"  # the default kohya modules: attention-only LoRAs learned nothing of a concept here
    seed: int = 0


@dataclass(frozen=True)
class DemoConfig:
    """What the demo merges, draws and scores.

    base: the base model (``mini`` = the built-in world; a folder for tests / other worlds).
    manifest: the concept manifest (None = the world's); missing file or LoRAs -> quick LoRAs.
    concepts: concept names from the manifest (empty = :data:`DEFAULT_CONCEPTS`).
    methods: merge methods, one merged model and grid column each.
    n_prompts, seeds, n_pairs, n_triples: suite sizes (see :func:`loraclr.evaluate.run_suite`); n_prompts and
        seeds default (None) to :data:`SUITES_QUICK` or, with no LoRAs to train, :data:`SUITES_SHIPPED`; the grid
        shows seed ``seed`` of the first single prompt of each concept and of every multi prompt.
    steps, guidance: sampling; feature_steps: the merge's spatial feature run.
    evaluators: a folder of world evaluator weights (None = the built-in ones).
    regions: how multi-concept prompts bind each character to its box (a mode of :mod:`loraclr.regional`,
        or None for the global prompt alone); region_start: the fraction of steps before they act;
        structure: a structure condition for regional rows ("layout": the world's layout adapter; a folder;
        "auto": the layout adapter when the base is the world's ``mini``; None: none).
    """

    base: str = "mini"
    manifest: str | None = None
    concepts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("loraclr",)
    quick: QuickLoras = field(default_factory=QuickLoras)
    n_prompts: int | None = None
    seeds: int | None = None
    n_pairs: int = 3
    n_triples: int = 1
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    feature_steps: int | None = None  # None: the merge's default (loraclr.recipe.FeatureSettings)
    evaluators: str | None = None
    regions: str | None = DEMO_REGIONS
    region_start: float | None = None  # None: loraclr.regional.DEFAULT_START
    structure: str | None = DEMO_STRUCTURE

    def validate(self) -> None:
        for name in ("n_prompts", "seeds", "steps", "feature_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_pairs", "n_triples"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo: {name} must be >= 0, got {getattr(self, name)}")
        if not self.methods:
            raise ValueError("demo: name at least one merge method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"demo: methods listed twice: {list(self.methods)}")
        for m in self.methods:
            get_method(m)  # KeyError naming the known methods
        q = self.quick
        if min(q.steps, q.n_images, q.batch, q.rank) < 1:
            raise ValueError(f"demo: quick LoRA steps, n_images, batch and rank must be >= 1, got {q}")
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"demo: concepts listed twice: {list(self.concepts)}")
        from loraclr.regional import MODES

        if self.regions is not None and self.regions not in MODES:
            raise ValueError(f"demo: unknown region mode {self.regions!r}; use one of {', '.join(MODES)} or none")
        if self.structure not in (None, "auto") and self.regions is None:
            raise ValueError("demo: a structure condition is drawn from the region boxes: set a region mode")


@dataclass
class DemoResult:
    out_dir: Path
    grid: Path
    table_md: Path
    table_json: Path
    markdown: str  # the metrics table with its notes
    rows: list[dict]  # one per model: {"key", "label", "single": {...} | None, "multi": {...} | None}
    concepts: list[str]
    quick: bool  # the concepts are quick LoRAs trained by the demo
    notes: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    grid_shape: tuple[int, int] = (0, 0)  # (rows, columns) of image cells


# --- concepts ------------------------------------------------------------------------------------------------


def _shipped(config: DemoConfig) -> tuple[list, str] | None:
    """The manifest's concepts to use, or None when the shipped LoRAs are missing (-> quick LoRAs)."""
    from loraclr.evaluate.concepts import WORLD_MANIFEST, load_manifest, select

    path = Path(config.manifest) if config.manifest else WORLD_MANIFEST
    if not path.is_file():
        log.info("no concept manifest at %s: training quick LoRAs", path)
        return None
    specs = load_manifest(path)
    if config.concepts:
        chosen = select(specs, list(config.concepts))  # ValueError naming unknown concepts
    else:
        chosen = [s for s in specs if s.name in DEFAULT_CONCEPTS]
        if len(chosen) < 2:
            log.info("%s lacks the default concepts %s: training quick LoRAs", path, DEFAULT_CONCEPTS)
            return None
    missing = [str(s.file) for s in chosen if s.file is None or not Path(s.file).is_file()]
    if missing:
        if config.concepts:
            raise FileNotFoundError(f"{path}: the LoRA files of the chosen concepts are missing: {missing}")
        log.info("shipped LoRA files missing (%s): training quick LoRAs", missing)
        return None
    return chosen, str(path)


def _quick_key(config: DemoConfig, base_dir: Path, state: dict | None) -> dict:
    """What the quick LoRAs depend on: a cache entry with another key is retrained."""
    weights = sorted(base_dir.glob("*/*.safetensors"))
    return {"quick": dataclasses.asdict(config.quick), "base": str(base_dir.resolve()),
            "base_step": (state or {}).get("step"),
            "base_files": {str(p.relative_to(base_dir)): [p.stat().st_size, int(p.stat().st_mtime)] for p in weights}}


def _train_quick(config: DemoConfig, base_dir: Path, state: dict | None, cache: Path, old_cache: Path | None,
                 progress: bool) -> Path:
    """Train (or reuse from ``old_cache``) the quick LoRAs into ``cache``; returns the manifest path."""
    import torch

    from loraclr.pipeline import family_of, load_base
    from loraclr.training import TrainConfig, save_trained, train_lora
    from loraclr.training import data as D

    q = config.quick
    names = list(config.concepts) or list(q.concepts)
    if len(names) < 2:
        raise ValueError(f"demo: merging needs at least two concepts, got {names}")
    key = _quick_key(config, base_dir, state)
    key["concepts"] = names
    key = json.loads(json.dumps(key))  # as it reads back from the cache (tuples become lists)
    cache.mkdir(parents=True)
    old_manifest = old_cache / "manifest.json" if old_cache is not None else None
    if old_manifest is not None and old_manifest.is_file():
        old = json.loads(old_manifest.read_text(encoding="utf-8"))
        if old.get("demo_key") == key and all((old_cache / e["file"]).is_file() for e in old["concepts"]):
            for e in old["concepts"]:
                shutil.copy2(old_cache / e["file"], cache / e["file"])
            shutil.copy2(old_manifest, cache / "manifest.json")
            log.info("reusing the quick LoRAs cached in %s", old_cache)
            return cache / "manifest.json"

    pipe = load_base(str(base_dir))
    avoid = D.caption_vocabulary_ids(pipe.tokenizer)
    entries = []
    for name in names:
        trigger = D.pick_trigger(pipe.tokenizer, name, avoid)
        phrase = "a {trigger} creature"
        data = D.world_identity_data(name, phrase.format(trigger=trigger), n=q.n_images, seed=q.seed)
        cfg = TrainConfig(rank=q.rank, alpha=q.alpha, steps=q.steps, batch=q.batch, prior_batch=0, lr=q.lr,
                          text_lr=q.text_lr, targets=q.targets, seed=q.seed)
        bar = _bar(q.steps, f"quick LoRA {name}", progress, "step")
        with torch.random.fork_rng():  # the trainer seeds torch globally; leave the caller's state alone
            result = train_lora(pipe, data, cfg, callback=lambda s, loss, b=bar: b.update(1), log_every=0)
        bar.close()
        file = f"{name}.safetensors"
        save_trained(result, cache / file, format="kohya", family=family_of(pipe), trigger=trigger,
                     metadata={"loraclr.concept": name, "loraclr.demo": "quick LoRA"})
        k = max(1, min(20, len(result.losses) // 2))
        entries.append({"name": name, "kind": "identity", "identity": name, "style": None, "trigger": trigger,
                        "phrase": phrase, "file": file, "format": "kohya", "rank": q.rank, "alpha": q.alpha,
                        "steps": q.steps, "seed": q.seed, "tokens": [],
                        "loss_first": sum(result.losses[:k]) / k, "loss_last": sum(result.losses[-k:]) / k,
                        "seconds": round(result.seconds, 1)})
        log.info("quick LoRA %s (trigger %r): %d steps in %.0f s, loss %.3f -> %.3f", name, trigger, q.steps,
                 result.seconds, entries[-1]["loss_first"], entries[-1]["loss_last"])
    manifest = {"base": str(base_dir), "base_step": (state or {}).get("step"), "demo_key": key,
                "note": "quick LoRAs trained by `loraclr demo` because the shipped concept LoRAs were missing",
                "concepts": entries}
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return cache / "manifest.json"


# --- images ----------------------------------------------------------------------------------------------------


class _Recorder:
    """An image source that keeps what it draws, so the grid shows the very images that were scored."""

    def __init__(self, source):
        self.source, self.name = source, source.name
        self.images: dict[tuple[str, int], Any] = {}  # (prompt text, seed) -> (3, H, W) in [0, 1]

    def trigger(self, spec) -> str:
        return self.source.trigger(spec)

    def __call__(self, prompt: str, seeds: list[int], regions=None, concepts=()):
        import torch

        if all((prompt, s) in self.images for s in seeds):
            return torch.stack([self.images[(prompt, s)] for s in seeds])
        images = self.source(prompt, seeds, regions=regions, concepts=concepts) if regions is not None else \
            self.source(prompt, seeds)
        for s, im in zip(seeds, images, strict=True):
            self.images[(prompt, s)] = im
        return images

    def image(self, prompt: str, seed: int, regions=None, concepts=()):
        return self(prompt, [seed], regions, concepts)[0]


def _prompt_text(prompt, specs, source) -> str:
    """The text a suite sends to ``source`` for ``prompt`` (as :func:`loraclr.evaluate.run_suite` fills it)."""
    words = {}
    for s in specs:
        trig = source.trigger(s)
        words[s.name] = s.prompt_phrase(trig) if hasattr(s, "prompt_phrase") else trig
    return prompt.fill(words)


def _bar(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def grid_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``n_rows`` prompts x ``n_cols`` models."""
    return LABEL_WIDTH + n_cols * CELL, HEADER_HEIGHT + n_rows * CELL + FOOTER_HEIGHT


def draw_grid(cells: list[list], row_labels: list[str], col_labels: list[str], footer: str = "",
              boxes: list[list] | None = None):
    """A labelled PIL image: ``cells[r][c]`` is a (3, H, W) tensor in [0, 1] or None (drawn as "n/a");
    ``boxes[r]``: the regions (x0, y0, x1, y1 fractions) that row was drawn with, outlined lightly."""
    from PIL import Image, ImageDraw

    n_rows, n_cols = len(row_labels), len(col_labels)
    if len(cells) != n_rows or any(len(r) != n_cols for r in cells):
        raise ValueError(f"grid: {len(cells)} rows of cells for {n_rows} labels x {n_cols} columns")
    canvas = Image.new("RGB", grid_size(n_rows, n_cols), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(11)
    for c, label in enumerate(col_labels):
        x = LABEL_WIDTH + c * CELL
        draw.text((x + CELL // 2, HEADER_HEIGHT // 2), label, fill="black", font=font, anchor="mm")
    for r, label in enumerate(row_labels):
        y = HEADER_HEIGHT + r * CELL
        lines = textwrap.wrap(label, 34)[:8]
        draw.multiline_text((6, y + CELL // 2), "\n".join(lines), fill="black", font=small, anchor="lm",
                            spacing=2)
        for c in range(n_cols):
            x = LABEL_WIDTH + c * CELL
            im = cells[r][c]
            if im is None:
                draw.rectangle((x + 1, y + 1, x + CELL - 2, y + CELL - 2), fill=(225, 225, 225))
                draw.multiline_text((x + CELL // 2, y + CELL // 2), "n/a\n(one LoRA\nper image)", fill="gray",
                                    font=small, anchor="mm", align="center")
                continue
            arr = (im.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((CELL, CELL), Image.NEAREST)
            if boxes and boxes[r] and c > 0:  # the own-LoRA column draws one concept per image: no regions
                over = Image.new("RGBA", tile.size, (0, 0, 0, 0))
                pen = ImageDraw.Draw(over)
                for x0, y0, x1, y1 in boxes[r]:
                    pen.rectangle((x0 * (CELL - 1) + 1, y0 * (CELL - 1) + 1, x1 * (CELL - 1) - 1, y1 * (CELL - 1) - 1),
                                  outline=(255, 255, 255, 110), width=2)
                tile = Image.alpha_composite(tile.convert("RGBA"), over).convert("RGB")
            canvas.paste(tile, (x, y))
    if footer:
        draw.text((6, HEADER_HEIGHT + n_rows * CELL + FOOTER_HEIGHT // 2), footer, fill=(90, 90, 90), font=small,
                  anchor="lm")
    return canvas


# --- the table -------------------------------------------------------------------------------------------------


def _mean(stat: dict | None) -> float | None:
    return None if stat is None else float(stat["mean"])


def _row(key: str, label: str, single: dict | None, multi: dict | None) -> dict:
    def pick(res, names):
        return None if res is None else {n: _mean(res["overall"].get(n)) for n in names}

    return {"key": key, "label": label, "single": pick(single, ("identity", "text", "image")),
            "multi": pick(multi, ("identity", "all_identities", "text", "image"))}


def table_markdown(rows: list[dict], notes: list[str]) -> str:
    """The metrics table: one row per model, overall means of the single- and multi-concept suites."""

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    ref = next((r["single"]["identity"] for r in rows if r["key"] == SINGLE and r["single"]), None)
    out = ["| model | single: identity | Δ identity vs own LoRA | single: text | single: image | "
           "multi: identity | multi: all identities | multi: text | multi: image |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["single"] or {}
        m = r["multi"] or {}
        si = s.get("identity")
        delta = "-" if si is None or ref is None or r["key"] == SINGLE else f"{si - ref:+.3f}"
        out.append(f"| {r['label']} | {f(si)} | {delta} | {f(s.get('text'))} | {f(s.get('image'))} | "
                   f"{f(m.get('identity'))} | {f(m.get('all_identities'))} | {f(m.get('text'))} | "
                   f"{f(m.get('image'))} |")
    return "\n".join(out + [""] + [f"- {n}" for n in notes]) + "\n"


# --- the demo --------------------------------------------------------------------------------------------------


def _load_evaluators(folder: str | None):
    """The world's evaluators, or (None, why) when they are not built."""
    from loraclr.evaluate import load_evaluators

    try:
        return load_evaluators(folder=folder), None
    except (FileNotFoundError, ValueError) as e:
        return None, str(e)


def _check_out(out_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    from loraclr.io.safe import check_output_path

    check_output_path(out_dir, [str(p) for p in inputs])
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a folder; choose another --out")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{out_dir}: not empty; choose another --out or pass --overwrite "
                                  "(the whole folder is replaced)")


def run_demo(config: DemoConfig = DemoConfig(), out_dir: str | Path = "demo-out", *, progress: bool = True,
             overwrite: bool = False, evaluators=None) -> DemoResult:
    """Run the demo into ``out_dir`` (see the module docstring); ``evaluators`` overrides the built-in ones.

    Raises FileNotFoundError when the base model does not exist, FileExistsError for a non-empty
    ``out_dir`` without ``overwrite``. Nothing is written unless everything succeeds.
    """
    from loraclr.evaluate import PipelineSource, Scorer, run_suite
    from loraclr.evaluate.concepts import load_manifest
    from loraclr.evaluate.suites import multi_prompts, single_prompts, summarise
    from loraclr.io.safe import atomic_write
    from loraclr.merging import merge
    from loraclr.pipeline import load_merged, load_with_loras, resolve_base
    from loraclr.recipe import recipe_from_dict
    from loraclr.world.model import read_training_state

    config.validate()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    base_dir = resolve_base(config.base)  # the FileNotFoundError of base_model_path() when not built
    state = read_training_state(base_dir)
    from loraclr.evaluate.concepts import WORLD_MANIFEST

    manifest_path = Path(config.manifest) if config.manifest else WORLD_MANIFEST
    inputs = [base_dir] + ([manifest_path.parent] if manifest_path.is_file() else [])
    _check_out(out_dir, overwrite, inputs)
    notes: list[str] = []
    if state is not None and state.get("total_steps") and int(state["step"]) < int(state["total_steps"]):
        base_note = f"partly trained base model (step {state['step']} of {state['total_steps']})"
    elif state is not None:
        base_note = f"base model trained for {state.get('step')} steps"
    else:
        base_note = "base model without training_state.json"

    if evaluators is None:
        evaluators, why = _load_evaluators(config.evaluators)
        if evaluators is None:
            notes.append(f"metrics skipped: the world's evaluators are not available ({why})")
            log.warning("metrics skipped: %s", why)
    old_cache = out_dir / "cache" / "quick-loras" if overwrite else None

    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        t = time.perf_counter()
        shipped = _shipped(config)
        quick = shipped is None
        if quick:
            manifest = _train_quick(config, base_dir, state, tmp / "cache" / "quick-loras", old_cache, progress)
            specs = load_manifest(manifest)
            q = config.quick
            notes.insert(0, f"concepts: QUICK LoRAs trained by the demo ({q.steps} steps x batch {q.batch} on "
                            f"{q.n_images} renders each, seed {q.seed}) on a {base_note}, because the shipped "
                            "concept LoRAs are missing; they show the pipeline working, not what the method "
                            "reaches with trained concepts")
        else:
            specs, manifest = shipped
            notes.insert(0, f"concepts: shipped concept LoRAs from {manifest}; {base_note}")
        timings["concepts"] = time.perf_counter() - t
        sizes = SUITES_QUICK if quick else SUITES_SHIPPED
        config = dataclasses.replace(config, **{k: v for k, v in sizes.items() if getattr(config, k) is None})
        names = [s.name for s in specs]
        allow_pickle = any(Path(s.file).suffix == ".pth" for s in specs)

        # merges
        merged: dict[str, Path] = {}
        fidelity: dict[str, dict] = {}
        t = time.perf_counter()
        for method in config.methods:
            recipe = recipe_from_dict({
                "base": str(base_dir), "method": method, "allow_pickle": allow_pickle,
                "concepts": [{"name": s.name, "lora": str(s.file), "trigger": s.trigger,
                              "prompts": [_phrase_template(s), "{trigger}"]} for s in specs],
                "features": {"seed": config.seed,
                             **({"steps": config.feature_steps} if config.feature_steps is not None else {})},
                "output": {"lora_formats": ["kohya"]},
            }, source="demo recipe")
            summary = merge(recipe, tmp / f"merged-{method}", progress=progress)
            merged[method] = summary.out_dir
            fidelity[method] = summary.fidelity
        timings["merge"] = time.perf_counter() - t

        # prompts: the suites' own, so the grid shows scored images
        single_by = {s.name: single_prompts(s, config.n_prompts, config.seed) for s in specs}
        multi = multi_prompts(specs, config.n_pairs, config.n_triples, config.seed)
        grid_prompts = [single_by[n][0] for n in names] + multi
        columns = [SINGLE, NAIVE] + list(config.methods)
        cells: dict[str, list] = {}
        results: dict[str, dict[str, dict]] = {}
        suite_kw = dict(n_prompts=config.n_prompts, seeds=config.seeds, seed=config.seed, n_pairs=config.n_pairs,
                        n_triples=config.n_triples, progress=progress)
        from loraclr.regional import DEFAULT_START

        start = DEFAULT_START if config.region_start is None else config.region_start
        multi_kw = {"regions": config.regions, "region_start": start} if config.regions else {}
        structure_name = config.structure
        if structure_name == "auto":
            structure_name = "layout" if config.base == "mini" and config.regions else None
        structure = None
        if structure_name:
            from loraclr.structure import load_structure

            structure = load_structure(structure_name)

        def plan_for(p, src):
            """The regional plan of a multi prompt (None for single prompts or without regions)."""
            if not config.regions or len(p.concepts) < 2:
                return None, ()
            words = {s.name: s.prompt_phrase(src.trigger(s)) for s in specs}
            return p.plan(words, config.regions, start), p.concepts
        scorer = Scorer(evaluators, specs) if evaluators is not None else None
        t = time.perf_counter()

        def source_for(model, label):
            src = PipelineSource(model, label, steps=config.steps, guidance=config.guidance)
            src.structure = structure
            return _Recorder(src)

        # 1. each concept with only its own LoRA (the reference before merging)
        column: list = [None] * len(grid_prompts)
        records = []
        for k, s in enumerate(specs):
            src = source_for(load_with_loras(str(base_dir), [(str(s.file), 1.0)], allow_pickle=allow_pickle),
                             f"own LoRA {s.name}")
            if scorer is not None:
                records += run_suite(src, [s], evaluators, "single", scorer=scorer, **suite_kw)["images"]
            column[k] = src.image(_prompt_text(grid_prompts[k], [s], src), config.seed)
        cells[SINGLE] = column
        if scorer is not None:
            results[SINGLE] = {"single": summarise(records, "single", "each concept's own LoRA", evaluators,
                                                   {"n_prompts": config.n_prompts, "seeds": config.seeds})}
        # 2. naive stacking and 3. the merged models: both suites
        models = [(NAIVE, lambda: load_with_loras(str(base_dir), [(str(s.file), 1.0) for s in specs],
                                                  allow_pickle=allow_pickle), "naive stack (sum of LoRA deltas)")]
        models += [(m, lambda m=m: load_merged(merged[m]), get_method(m).label) for m in config.methods]
        for key, load, label in models:
            src = source_for(load(), label)
            if scorer is not None:
                results[key] = {suite: run_suite(src, specs, evaluators, suite, scorer=scorer, **suite_kw,
                                                 **(multi_kw if suite == "multi" else {}))
                                for suite in ("single", "multi") if suite == "single" or multi}
            cells[key] = [src.image(_prompt_text(p, specs, src), config.seed, *plan_for(p, src)) for p in grid_prompts]
        timings["images_and_metrics"] = time.perf_counter() - t

        # outputs
        labels = {SINGLE: COLUMN_LABELS[SINGLE], NAIVE: COLUMN_LABELS[NAIVE],
                  **{m: get_method(m).label for m in config.methods}}
        row_labels = [p.template.format(**{n: n for n in names}) for p in grid_prompts]
        footer = ("QUICK LoRAs on a " if quick else "shipped LoRAs, ") + base_note + \
            f"; seed {config.seed}, {config.steps} steps, guidance {config.guidance:g}"
        if config.regions:
            footer += f"; multi rows: {config.regions} regions from {start:.0%} of the steps" + \
                (f", {structure_name} structure" if structure_name else "")
        boxes = [[r.box for r in p.plan({n: n for n in names}, config.regions, start).regions]
                 if config.regions and len(p.concepts) > 1 else None for p in grid_prompts]
        canvas = draw_grid([[cells[c][r] for c in columns] for r in range(len(grid_prompts))], row_labels,
                           [labels[c] for c in columns], footer, boxes)
        canvas.save(tmp / "grid.png")
        rows = [_row(c, labels[c] + (" (reference)" if c == SINGLE else ""), results.get(c, {}).get("single"),
                     results.get(c, {}).get("multi")) for c in columns]
        if evaluators is not None:
            ev = results[NAIVE]["single"]["evaluators"]
            notes.append(f"metrics: overall means over {config.n_prompts} prompts x {config.seeds} seeds per "
                         f"concept (single) and {len(multi)} multi-concept prompts x {config.seeds} seeds; "
                         f"evaluators {ev['text_image']} / {ev['identity']} (identity threshold "
                         f"{ev['identity_threshold']}); 95 % intervals in metrics.json")
        markdown = table_markdown(rows, notes)
        (tmp / "metrics.md").write_text(markdown, encoding="utf-8")
        payload = {"rows": rows, "notes": notes, "concepts": names, "quick_loras": quick,
                   "base": str(base_dir), "base_training_state": state, "manifest": str(manifest),
                   "merge_fidelity": fidelity,
                   "results": {k: {s: {kk: vv for kk, vv in r.items() if kk != "images"} for s, r in v.items()}
                               for k, v in results.items()},
                   "images": {k: {s: r["images"] for s, r in v.items()} for k, v in results.items()}}
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        timings["total"] = time.perf_counter() - t_start
        (tmp / "demo.json").write_text(json.dumps({
            "config": dataclasses.asdict(config), "grid": {"rows": row_labels, "columns": [labels[c] for c in columns]},
            "timings_s": {k: round(v, 1) for k, v in timings.items()}, "notes": notes,
        }, indent=1) + "\n", encoding="utf-8")
    log.info("demo written to %s in %.0f s", out_dir, timings["total"])
    return DemoResult(out_dir=out_dir, grid=out_dir / "grid.png", table_md=out_dir / "metrics.md",
                      table_json=out_dir / "metrics.json", markdown=markdown, rows=rows, concepts=names,
                      quick=quick, notes=notes, timings=timings, grid_shape=(len(grid_prompts), len(columns)))


def _phrase_template(spec) -> str:
    """The concept's prompt words with ``{trigger}`` left in (feature-collection prompt of the merge)."""
    if hasattr(spec, "prompt_phrase"):
        return spec.prompt_phrase("{trigger}")
    return "{trigger}"

