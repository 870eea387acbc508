"""The per-layer driver (:func:`solve_layers`) and method configs by name.

The built-in methods, registered when ``loraclr.merge`` is imported: ``loraclr`` (modes ``paper`` /
``converged``), ``lstsq``, ``sum``, ``average``, ``svd``, ``ties``, ``dare``, and the reference ``none`` (no
LoRA weight, learned tokens only); see each function's docstring for what it computes and which features it
needs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tqdm.auto import tqdm

from loraclr.merge._common import all_finite, has_rows
from loraclr.merge.api import Callback, LayerProblem, LayerResult, get_method

logger = logging.getLogger(__name__)


def make_config(method: str, **overrides: Any):
    """The method's config with ``overrides`` applied (from YAML / CLI); unknown fields -> ValueError."""
    cls = get_method(method).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for merge method {method!r}; known: {sorted(fields)}")
    return cls(**overrides)


def resolve_config(method: str, config: Any = None):
    """``config`` as an instance of the method's config class: None (the method's defaults), a mapping of
    overrides (see :func:`make_config`), or an instance already."""
    spec = get_method(method)
    if config is None:
        return spec.config_cls()
    if isinstance(config, Mapping):
        return make_config(method, **config)
    if not isinstance(config, spec.config_cls):
        raise ValueError(
            f"config for merge method {method!r} must be a {spec.config_cls.__name__} or a mapping, "
            f"got {type(config).__name__}"
        )
    return config


def solve_layers(
    problems: Iterable[LayerProblem],
    method: str,
    config: Any = None,
    callback: Callback | None = None,
    *,
    progress: bool = True,
    desc: str | None = None,
    total: int | None = None,
) -> Iterator[tuple[LayerProblem, LayerResult, float]]:
    """The per-layer driver: solve each layer with ``method`` and yield (problem, result, seconds), in input
    order. The merge (:mod:`loraclr.merging`) and :func:`merge_offsets` both run this loop, so the tests
    exercise the production path.

    ``problems`` may be a generator, so features can be produced (and freed) one layer at a time. Each
    result's offset is checked finite before it is yielded: nothing downstream writes NaN/inf weights.
    config: see :func:`resolve_config`. progress: show a tqdm bar (switch off for ``--quiet`` or in tests).
    """
    spec = get_method(method)
    config = resolve_config(method, config)
    if total is None and hasattr(problems, "__len__"):
        total = len(problems)
    seen: set[str] = set()
    bar = tqdm(problems, total=total, desc=desc or f"merge ({method})", unit="layer", disable=not progress)
    for problem in bar:
        if problem.key in seen:
            raise ValueError(f"layer {problem.key} appears twice in the merge problems")
        seen.add(problem.key)
        if spec.needs_features and not has_rows(problem) and problem.gram is None and problem.deltas:
            raise ValueError(
                f"layer {problem.key}: merge method {method!r} needs features (X or gram), none were "
                "collected for this layer"
            )
        t0 = time.perf_counter()
        result = spec.fn(problem, config, callback)
        seconds = time.perf_counter() - t0
        if not all_finite(result.offset):
            raise ValueError(
                f"layer {problem.key}: the {method} solve produced NaN/inf; try another method or settings"
            )
        yield problem, result, seconds


def merge_offsets(
    problems: Iterable[LayerProblem],
    method: str,
    config: Any = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> dict[str, LayerResult]:
    """Merge every layer with ``method`` (:func:`solve_layers`); returns {layer key: LayerResult} in input
    order."""
    start = time.perf_counter()
    results = {p.key: r for p, r, _ in solve_layers(problems, method, config, callback, progress=progress)}
    unconverged = [k for k, r in results.items() if r.report.get("converged") is False]
    logger.info(
        "merged %d layers with %s in %.1f s%s",
        len(results),
        method,
        time.perf_counter() - start,
        f"; {len(unconverged)} not converged (e.g. {unconverged[0]})" if unconverged else "",
    )
    return results
