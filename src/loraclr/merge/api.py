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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor


class LowRankDeltas(Sequence):
    """N deltas kept as LoRA factors: ``self[i] = scales[i] * ups[i] @ downs[i]`` (out, in), built on access
    and not cached. A drop-in for ``LayerProblem.deltas`` where every concept's delta is low-rank (or zero:
    rank 0), so methods that only need their sum get it as one product of the concatenated factors
    (:meth:`sum`) instead of N dense (out, in) deltas: one product of rank sum_i r_i, and no N dense deltas
    in memory at once. Still a sum of deltas (STYLE.md): each up is scaled by its own
    concept's factor, never averaged with another concept's.

    ups[i] (out, r_i), downs[i] (r_i, in), scales[i] a number (alpha / rank x strength).
    """

    def __init__(self, ups: list[Tensor], downs: list[Tensor], scales: list[float]):
        if not (len(ups) == len(downs) == len(scales)):
            raise ValueError(f"{len(ups)} ups, {len(downs)} downs and {len(scales)} scales: one each per concept")
        self.ups, self.downs, self.scales = list(ups), list(downs), [float(s) for s in scales]

    def __len__(self) -> int:
        return len(self.ups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        # scaled in place after the product: the same values as LoraLayer.delta() at strength 1
        return (self.ups[i] @ self.downs[i]).mul_(self.scales[i])

    def sum(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """sum_i dW_i (out, in) as one product [s_1 up_1, ..., s_N up_N] @ [down_1; ...; down_N]."""
        up = torch.cat([u.to(device=device, dtype=dtype) * s for u, s in zip(self.ups, self.scales, strict=True)], 1)
        down = torch.cat([d.to(device=device, dtype=dtype) for d in self.downs], 0)
        return up @ down


@dataclass
class LayerProblem:
    """Everything a method may use to merge one layer. Feature-free methods read only W0 and deltas."""

    key: str  # canonical layer key, for reports and error messages
    W0: Tensor  # (out, in)
    deltas: list[Tensor] | LowRankDeltas  # N x (out, in)
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
    """A registered method: everything the rest of the package says about it comes from here (the recipe's
    preset, the CLI's help, the demo's and reports' labels). Write the fields as keywords.

    name: the registry name (recipes, ``--method``). fn: the pure per-layer function
    ``fn(problem, config, callback) -> LayerResult``. config_cls: a frozen dataclass of its settings (field
    defaults = the paper's / reference's values). needs_features: True if it reads X (or gram), False if W0
    and deltas are enough. reference: the paper / code it follows. summary: one line of what it computes
    (CLI help). label: how images and tables name its merges (default: "<name> merge"). preset: the settings a
    recipe gets when it names the method without a ``mode`` (empty: the config's defaults), see
    :func:`resolve_settings`.
    """

    name: str
    fn: MethodFn
    config_cls: type
    needs_features: bool
    reference: str
    # The five fields above may still be given by position (bench/stages.py registers a probe that way);
    # the rest only by keyword.
    _: KW_ONLY
    summary: str = ""
    label: str = ""
    preset: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", f"{self.name} merge")
        object.__setattr__(self, "preset", MappingProxyType(dict(self.preset)))  # frozen all the way


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; the error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None


def all_methods() -> dict[str, MergeMethod]:
    """Every registered method by name."""
    return dict(METHODS)


def resolve_settings(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a merge with method ``name`` uses: ``settings`` on top of the method's preset when they
    name no ``mode``; any explicit mode starts from the config's own defaults (for ``loraclr``, ``mode:
    paper`` is the official recipe). Unknown names pass through (the merge reports them)."""
    method = all_methods().get(name)
    if method is None or not method.preset or "mode" in settings:
        return dict(settings)
    return {**method.preset, **settings}


def describe_settings(settings: Mapping[str, Any]) -> str:
    """``{"mode": "converged", "ridge": 0.1}`` -> ``"mode converged, ridge 0.1"`` (help texts, labels)."""
    return ", ".join(f"{k} {v}" for k, v in settings.items())
