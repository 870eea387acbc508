"""Helpers shared by the merge methods: input checks, the deltas, the rows and their statistics (linear
algebra: :mod:`loraclr.merge.linalg`).

Everything here is a pure tensor function (STYLE.md). Shapes follow :mod:`loraclr.merge.api`:
W0 and deltas (out, in), X[i] (n_i, in), gram[i] (in, in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from loraclr.merge.api import LayerProblem, LowRankDeltas
from loraclr.merge.linalg import gram_matrix

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"{field_name} must be one of {sorted(_DTYPES)}, got {name!r}") from None


def check_device(name: str) -> None:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch device string such as 'cpu' or 'cuda:0', got {name!r}"
        ) from None


def all_finite(t: Tensor) -> bool:
    """No NaN/inf in t. One reduction pass: NaN/inf propagate into the sum; only if the sum is not finite
    (bad values, or finite values overflowing) is the elementwise check run. The sum runs in t's own dtype:
    an fp64 accumulator would add a converting pass over t, and an overflow only sends it to the exact
    check."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def has_rows(problem: LayerProblem) -> bool:
    """Raw rows were kept for every concept (feature stores may hold None where only Grams were kept)."""
    return problem.X is not None and all(x is not None for x in problem.X)


def check_problem(problem: LayerProblem) -> tuple[int, int, int]:
    """Validate W0 / deltas / names; return (N, out, in). Raises ValueError naming the layer."""
    key = problem.key
    if problem.W0.dim() != 2:
        raise ValueError(
            f"layer {key}: W0 must be 2-D (out, in); flatten convolution weights to (out, in*kh*kw) "
            f"first, got shape {tuple(problem.W0.shape)}"
        )
    out_dim, in_dim = problem.W0.shape
    if isinstance(problem.deltas, LowRankDeltas):
        _check_factors(problem, out_dim, in_dim)
    for i, d in enumerate(() if isinstance(problem.deltas, LowRankDeltas) else problem.deltas):
        if tuple(d.shape) != (out_dim, in_dim):
            raise ValueError(
                f"layer {key}: delta of concept {_name(problem, i)} has shape {tuple(d.shape)}, "
                f"expected the base weight's {(out_dim, in_dim)}"
            )
        if not all_finite(d):
            raise ValueError(f"layer {key}: delta of concept {_name(problem, i)} has NaN/inf values")
    if problem.concept_names and len(problem.concept_names) != len(problem.deltas):
        raise ValueError(
            f"layer {key}: {len(problem.concept_names)} concept names for {len(problem.deltas)} deltas"
        )
    return len(problem.deltas), out_dim, in_dim


def _check_factors(problem: LayerProblem, out_dim: int, in_dim: int) -> None:
    """check_problem for LowRankDeltas, on the factors (no dense delta built). Finite factors can still
    overflow in the product: the methods check their result as well."""
    for i, (u, d) in enumerate(zip(problem.deltas.ups, problem.deltas.downs, strict=True)):
        if u.dim() != 2 or d.dim() != 2 or u.shape[0] != out_dim or d.shape[1] != in_dim or u.shape[1] != d.shape[0]:
            raise ValueError(
                f"layer {problem.key}: factors of concept {_name(problem, i)} have shapes {tuple(u.shape)} and "
                f"{tuple(d.shape)}, expected (out, r) and (r, in) for the base weight's {(out_dim, in_dim)}"
            )
        if not (all_finite(u) and all_finite(d) and math.isfinite(problem.deltas.scales[i])):
            raise ValueError(f"layer {problem.key}: delta of concept {_name(problem, i)} has NaN/inf values")


def _name(problem: LayerProblem, i: int) -> str:
    return repr(problem.concept_names[i]) if problem.concept_names else f"#{i}"


def stacked_deltas(problem: LayerProblem, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """(N, out, in) in the compute dtype; (0, out, in) for no concepts."""
    if not problem.deltas:
        return problem.W0.new_zeros((0, *problem.W0.shape), dtype=dtype, device=device)
    return torch.stack([d.to(device=device, dtype=dtype) for d in problem.deltas])


def summed_deltas(problem: LayerProblem, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """sum_i dW_i (out, in) in the compute dtype: one product of the factors for LowRankDeltas, else
    accumulated in place, with no (N, out, in) stack (for 12 SD 1.5 ff deltas, 630 MB allocated and copied
    only to be reduced); zeros for no concepts."""
    if not problem.deltas:
        return problem.W0.new_zeros(problem.W0.shape, dtype=dtype, device=device)
    if isinstance(problem.deltas, LowRankDeltas):
        return problem.deltas.sum(dtype, device)
    total = problem.deltas[0].to(device=device, dtype=dtype, copy=True)
    for d in problem.deltas[1:]:
        total += d.to(device=device, dtype=dtype)
    return total


def rows(problem: LayerProblem, method: str, dtype: torch.dtype, device) -> list[Tensor]:
    """The raw feature rows X_i (n_i, in), checked; ValueError naming the layer when they were not kept."""
    n, in_dim = len(problem.deltas), problem.W0.shape[1]
    if not has_rows(problem):
        raise ValueError(
            f"layer {problem.key}: method {method!r} needs the raw feature rows X (LayerProblem.X), "
            "but only statistics were collected; keep rows for this layer or pick a method that works "
            "from Grams"
        )
    if len(problem.X) != n:
        raise ValueError(f"layer {problem.key}: {len(problem.X)} feature blocks for {n} concepts")
    out = []
    for i, x in enumerate(problem.X):
        if x.dim() != 2 or x.shape[1] != in_dim or x.shape[0] < 1:
            raise ValueError(
                f"layer {problem.key}: X of concept {_name(problem, i)} has shape {tuple(x.shape)}, "
                f"expected (n_rows >= 1, {in_dim})"
            )
        x = x.to(device=device, dtype=dtype)
        if not all_finite(x):
            raise ValueError(f"layer {problem.key}: X of concept {_name(problem, i)} has NaN/inf values")
        out.append(x)
    return out


@dataclass
class GramStats:
    """Per-concept second moments: gram (N, in, in) = X_i^T X_i, n_rows (N,)."""

    gram: Tensor
    n_rows: list[int]


def gram_stats(
    problem: LayerProblem, method: str, dtype: torch.dtype, device, xs: list[Tensor] | None = None
) -> GramStats:
    """G_i = X_i^T X_i from ``problem.gram`` when given (full statistics), else from the raw rows
    (``xs``: the rows already checked by :func:`rows`, to avoid a second pass)."""
    n, in_dim = len(problem.deltas), problem.W0.shape[1]
    if problem.gram is not None:
        if len(problem.gram) != n:
            raise ValueError(f"layer {problem.key}: {len(problem.gram)} Grams for {n} concepts")
        if problem.n_rows is None or len(problem.n_rows) != n:
            raise ValueError(
                f"layer {problem.key}: LayerProblem.gram needs n_rows (rows behind each Gram), one per concept"
            )
        grams = []
        for i, g in enumerate(problem.gram):
            if tuple(g.shape) != (in_dim, in_dim):
                raise ValueError(
                    f"layer {problem.key}: Gram of concept {_name(problem, i)} has shape {tuple(g.shape)}, "
                    f"expected {(in_dim, in_dim)}"
                )
            g = g.to(device=device, dtype=dtype)
            if not all_finite(g):
                raise ValueError(
                    f"layer {problem.key}: Gram of concept {_name(problem, i)} has NaN/inf values"
                )
            grams.append(g)
        if any(int(k) < 1 for k in problem.n_rows):
            raise ValueError(f"layer {problem.key}: n_rows must be >= 1, got {problem.n_rows}")
        gram = torch.stack(grams) if grams else torch.zeros(0, in_dim, in_dim, dtype=dtype, device=device)
        return GramStats(gram, [int(k) for k in problem.n_rows])
    if not has_rows(problem):
        raise ValueError(
            f"layer {problem.key}: method {method!r} needs features: LayerProblem.X (raw rows) or "
            "LayerProblem.gram with n_rows; collect features for this layer or use a feature-free method "
            "(sum, average, svd, ties, dare)"
        )
    xs = rows(problem, method, dtype, device) if xs is None else xs
    gram = (
        torch.stack([gram_matrix(x) for x in xs])
        if xs
        else torch.zeros(0, in_dim, in_dim, dtype=dtype, device=device)
    )
    return GramStats(gram, [x.shape[0] for x in xs])


def common_row_index(n_rows: list[int], device=None) -> list[Tensor]:
    """Rows used to compare concept blocks whose row counts differ (negatives in LoRACLR).

    All blocks are cut to m = min_i n_i rows, taken evenly spaced over each block
    (``round(linspace(0, n_i - 1, m))``): deterministic, covers the whole prompt / trajectory, and is the
    identity (all rows, in order) when every concept has m rows -- the official code's case.
    """
    if not n_rows:
        return []
    m = min(n_rows)
    out = []
    for n in n_rows:
        if n == m:
            out.append(torch.arange(n, device=device))
        else:
            out.append(torch.linspace(0, n - 1, m, dtype=torch.float64, device=device).round().long())
    return out


def rhs_and_const(
    dW: Tensor, G: Tensor, X: list[Tensor] | None, a: Tensor, solve_dtype: torch.dtype
) -> tuple[Tensor, float]:
    """B = sum_i a_i dW_i G_i (out, in) in solve_dtype, and c = sum_i a_i ||X_i dW_i^T||^2.

    Per concept through the rows (2 n_i in out flops) when it has fewer rows than inputs, else through the
    Gram (out in^2). ``X`` must be the rows behind ``G`` (None when only Grams were kept)."""
    n, out_dim, in_dim = dW.shape
    B = torch.zeros(out_dim, in_dim, dtype=solve_dtype, device=dW.device)
    c = 0.0
    for i in range(n):
        ai = float(a[i])
        if X is not None and X[i].shape[0] < in_dim:
            T = X[i] @ dW[i].T  # (n_i, out)
            B += ai * (T.T @ X[i]).to(solve_dtype)
            c += ai * float(T.pow(2).sum(dtype=torch.float64))
        else:
            K = dW[i] @ G[i]  # (out, in)
            B += ai * K.to(solve_dtype)
            c += ai * float((K * dW[i]).sum(dtype=torch.float64))
    return B, c


def sq_errors(D: Tensor, dW: Tensor, G: Tensor, X: list[Tensor] | None) -> Tensor:
    """||X_i (D - dW_i)^T||_F^2 per concept (N,) in float64, through rows or Grams like :func:`rhs_and_const`."""
    n, _, in_dim = dW.shape
    out = []
    for i in range(n):
        E = D.to(dW.dtype) - dW[i]
        if X is not None and X[i].shape[0] < in_dim:
            out.append(float((X[i] @ E.T).pow(2).sum(dtype=torch.float64)))
        else:
            out.append(max(float(((E @ G[i]) * E).sum(dtype=torch.float64)), 0.0))
    return torch.tensor(out, dtype=torch.float64)


