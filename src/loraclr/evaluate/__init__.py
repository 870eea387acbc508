"""Text, image and identity alignment of generated images (LoRACLR Table 1), with the miniature world's
evaluators by default and real CLIP / face models for users who have them.

Public API:
* metrics (pure functions): :mod:`loraclr.evaluate.metrics` (``cosine``, ``distances``, ``recognised``,
  ``mean_ci``, ``retrieval_top1``, thresholds);
* evaluators: :func:`load_evaluators` (ours, or ``clip=`` a transformers CLIPModel folder, ``face=True`` for
  dlib), :class:`Evaluators`;
* suites: :func:`run_suite` on any :class:`ImageSource`, :func:`evaluate_model` (a merged output, base +
  LoRAs stacked, or base alone), :func:`evaluate_own_loras` (each concept with only its own LoRA: the
  "before merging" reference), :func:`to_markdown`;
* concepts: :func:`load_manifest`, :class:`ConceptSpec`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loraclr.evaluate.base import Evaluators, IdentityModel, TextImageModel
from loraclr.evaluate.concepts import WORLD_MANIFEST, ConceptSpec, load_manifest, select
from loraclr.evaluate.suites import ImageSource, PipelineSource, Prompt, Scorer, run_suite, to_markdown

log = logging.getLogger(__name__)

__all__ = [
    "ConceptSpec", "Evaluators", "IdentityModel", "ImageSource", "PipelineSource", "Prompt", "Scorer",
    "TextImageModel", "WORLD_MANIFEST", "evaluate_model", "evaluate_own_loras", "evaluate_own_loras_per_region",
    "load_evaluators",
    "load_manifest", "run_suite", "select", "to_markdown",
]


def load_evaluators(clip: str | Path | None = None, face: bool = False, folder: str | Path | None = None,
                    face_threshold: float | None = None) -> Evaluators:
    """Our world evaluators, with ``clip`` replacing the text-image model and ``face`` the identity model.

    Without ``face``, identity alignment uses our embedder, which knows only the miniature world's
    creatures (suites skip it, with a warning, for concepts that are not world identities).
    """
    from loraclr.evaluate.world import ASSETS, load_world_evaluator

    folder = Path(folder or ASSETS)
    if clip is None and not face:
        return load_world_evaluator(folder)
    ours = load_world_evaluator(folder) if (folder / "evaluators.json").is_file() else None
    if clip is not None:
        from loraclr.evaluate.external import HFClip

        text_image = HFClip(clip)
    elif ours is not None:
        text_image = ours.text_image
    else:
        raise FileNotFoundError(f"{folder}: no evaluator weights; pass --clip DIR or build them with "
                                "scripts/train_evaluators.py")
    identity = ours.identity if ours is not None else None
    if face:
        from loraclr.evaluate.external import DlibFace

        identity = DlibFace() if face_threshold is None else DlibFace(face_threshold)
    info = dict(ours.info) if ours is not None else {}
    info.update({"clip": str(clip) if clip else None, "face": face})
    return Evaluators(text_image, identity, info)


def evaluate_model(model, specs: list[ConceptSpec], evaluators: Evaluators, suites=("single", "multi"), *,
                   loras: list[tuple[str, float]] | None = None, name: str | None = None, steps: int = 25,
                   guidance: float = 7.5, allow_pickle: bool = False, regions: str | None = None,
                   region_start: float | None = None, structure=None, **kw) -> list[dict]:
    """Run ``suites`` on one model: a merged output folder, a base model (``mini``, folder, checkpoint) with
    ``loras`` stacked naively, or a loaded :class:`loraclr.pipeline.Model`. ``regions``: draw the multi suite
    with each character bound to its region (a mode of :mod:`loraclr.regional`), with ``structure`` (a
    :class:`loraclr.structure.Structure`) drawn from the boxes if given."""
    from loraclr.pipeline import Model, load_model

    m = model if isinstance(model, Model) else load_model(model, loras or [], allow_pickle=allow_pickle)
    label = name or (str(model) if not isinstance(model, Model) else "model")
    if loras:
        label += " + " + " + ".join(Path(f).stem for f, _ in loras)
    source = PipelineSource(m, label, steps=steps, guidance=guidance)
    source.structure = structure
    scorer = Scorer(evaluators, specs)
    return [run_suite(source, specs, evaluators, s, scorer=scorer,
                      **(dict(regions=regions, region_start=region_start) if s == "multi" else {}), **kw)
            for s in suites]


def evaluate_own_loras_per_region(base: str | Path, specs: list[ConceptSpec], evaluators: Evaluators, *,
                                  steps: int = 25, guidance: float = 7.5, allow_pickle: bool = False,
                                  region_start: float | None = None, structure=None, **kw) -> dict:
    """The multi suite drawn by the base model with each region denoised by its own concept's LoRA alone
    (:class:`loraclr.evaluate.suites.OwnLorasPerRegion`): the upper reference for regional images."""
    from loraclr.evaluate.suites import OwnLorasPerRegion

    source = OwnLorasPerRegion(base, [s for s in specs if s.kind == "identity"], steps=steps, guidance=guidance,
                               allow_pickle=allow_pickle)
    source.structure = structure
    return run_suite(source, specs, evaluators, "multi", regions="noise", region_start=region_start, **kw)


def evaluate_own_loras(base: str | Path, specs: list[ConceptSpec], evaluators: Evaluators, *, steps: int = 25,
                       guidance: float = 7.5, allow_pickle: bool = False, **kw) -> dict:
    """The single-concept suite where each concept is drawn by the base model with only its own LoRA (the
    reference that merging is compared against); one results dict over all concepts."""
    from loraclr.evaluate.suites import summarise
    from loraclr.pipeline import load_with_loras

    scorer = Scorer(evaluators, specs)
    records, settings = [], {}
    for spec in specs:
        if spec.file is None:
            raise ValueError(f"concept {spec.name!r} has no LoRA 'file' in the manifest")
        m = load_with_loras(str(base), [(str(spec.file), 1.0)], allow_pickle=allow_pickle)
        source = PipelineSource(m, f"{base} + {spec.file.name}", steps=steps, guidance=guidance)
        image_dir = kw.pop("image_dir", None)
        res = run_suite(source, [spec], evaluators, "single", scorer=scorer,
                        image_dir=None if image_dir is None else Path(image_dir) / spec.name, **kw)
        kw["image_dir"] = image_dir
        records += res["images"]
        settings = res["settings"]
    return summarise(records, "single", f"{base} + each concept's own LoRA", evaluators, settings)
