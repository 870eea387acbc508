"""The one signature every merge method has, and the registry that finds methods by name.

A merge method is a pure function on tensors for ONE layer (STYLE.md): no hooks, files or pipelines.
Feature collection (``loraclr.features``) builds a :class:`LayerProblem` per layer; the method returns a
:class:`LayerResult` whose ``offset`` D is added to the base weight: ``W_merged = W0 + D``.

Shapes (convolutions are flattened: in = in_channels * kh * kw, and their inputs are unfolded patches):
    W0        (out, in)          base weight, bias excluded
    deltas[i] (out, in)          concept i's dW_i = strength_i * alpha_i / r_i * B_i @ A_i
    X[i]      (n_i, in)          concept i's layer inputs (rows = tokens, or positions x timesteps),
                                 recorded with concept i's LoRA active; Y_i = X_i (W0 + dW_i)^T is implied
    gram[i]   (in, in)           X_i^T X_i, when only statistics were kept (see ``LayerProblem``)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class LayerProblem:
    """Everything a method may use to merge one layer. Feature-free methods read only W0 and deltas."""

    key: str  # canonical layer key, for reports and error messages
    W0: Tensor  # (out, in)
    deltas: list[Tensor]  # N x (out, in)
    X: list[Tensor] | None = None  # N x (n_i, in); raw rows (possibly subsampled), when kept
    gram: list[Tensor] | None = None  # N x (in, in); X_i^T X_i, when only statistics were kept
    n_rows: list[int] | None = None  # N; rows behind each gram (for means / MSE normalisation)
    concept_names: list[str] = field(default_factory=list)
    ranks: list[int | None] | None = None  # N; LoRA rank behind each delta (None: dense), when known


@dataclass
class LayerResult:
    """The merge of one layer.

    offset: D (out, in), the merged weight is W0 + D.
    report: per-layer numbers, JSON-serialisable: at least ``loss`` (final objective, or None for methods
        without one) and ``converged`` (bool or None); the contrastive methods add ``pos_dist``,
        ``neg_dist`` (lists over concepts), ``hinge_active`` (fraction of active hinge terms), ``steps``.
    """

    offset: Tensor
    report: dict[str, Any] = field(default_factory=dict)


# callback(layer_key, step, loss) -- lets callers show progress or record curves; may be None.
Callback = Callable[[str, int, float], None]
MethodFn = Callable[..., LayerResult]  # fn(problem: LayerProblem, config, callback: Callback | None)


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. ``config_cls`` is a frozen dataclass of its settings (defaults = recommended)."""

    name: str
    fn: MethodFn
    config_cls: type
    needs_features: bool  # True: needs X (or gram); False: W0 and deltas are enough
    reference: str  # paper / code the method follows
    summary: str = ""


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; the error lists the known ones."""
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None


def _load_builtin_methods() -> None:
    # Importing the modules registers their methods (kept lazy to avoid import cycles).
    import loraclr.merge.methods  # noqa: F401
