"""``lstsq``: Mix-of-Show gradient fusion's objective, solved exactly from the Grams.

Mix-of-Show (Gu et al. 2023, ``gradient_fusion.py``) fits one weight to all concepts' recorded pairs,
min_W sum_i ||X_i W^T - Y_i||^2, with L-BFGS started at W0. With W = W0 + D and Y_i = X_i (W0 + dW_i)^T
this is min_D sum_i ||X_i (D - dW_i)^T||_F^2, whose normal equations are

    D (sum_i G_i) = sum_i dW_i G_i,        G_i = X_i^T X_i   (in, in)

so only the Grams are needed (no raw rows), and the solve is one Cholesky factorisation (or, where the
rcond cut-off removes directions, one symmetric eigendecomposition).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraclr.merge._common import (
    GramStats,
    check_device,
    check_problem,
    gram_stats,
    has_rows,
    resolve_dtype,
    rhs_and_const,
    rows,
    sq_errors,
    stacked_deltas,
)
from loraclr.merge.api import Callback, LayerProblem, LayerResult, MergeMethod, register
from loraclr.merge.linalg import (
    check_solver,
    gram_matrix,
    gram_sum,
    relative_ridge,
    row_basis,
    solve_quadratic_fro,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LstsqConfig:
    """rcond: eigen-directions of sum_i G_i below rcond * its largest eigenvalue count as unexcited (see
    :func:`merge_lstsq`). ridge: optional Tikhonov term ridge * mean eigenvalue * ||D||_F^2 added to the
    objective (0 = the exact minimum-norm least-squares solution). device / dtype: where and in which
    precision the Grams are formed; solve_dtype: precision of the (in, in) solve. solver: "auto" (default)
    solves by Cholesky when a shifted factorisation proves that no eigen-direction falls below the rcond
    cut-off, else by eigendecomposition; "eigh" always by eigendecomposition (the reference, see
    :class:`loraclr.merge.linalg.QuadSolver`)."""

    rcond: float = 1e-6
    ridge: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    solve_dtype: str = "float64"
    solver: str = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.rcond < 1:
            raise ValueError(f"rcond must be in [0, 1), got {self.rcond!r}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.solve_dtype, "solve_dtype")
        check_solver(self.solver)
        check_device(self.device)


def merge_lstsq(problem: LayerProblem, config: LstsqConfig, callback: Callback | None = None) -> LayerResult:
    """Exact least squares over all concepts' features (Mix-of-Show gradient fusion objective).

    Needs features: ``X`` (raw rows) or ``gram`` + ``n_rows``. Solves D (sum G_i + r I) = sum dW_i G_i
    (r = ridge * mean eigenvalue of G, 0 by default) as if by an eigendecomposition of G = sum G_i:
    D = sum_i dW_i G_i V diag(1 / (l + r)) V^T over the kept directions (by Cholesky when none is cut).

    Directions that no concept's inputs span (eigenvalues of G at most rcond * max eigenvalue) get D = 0,
    i.e. the merged layer keeps W0 there: this is the minimum-norm solution, and also what Mix-of-Show's
    L-BFGS started at W0 converges to, because the objective's gradient has no component in those
    directions. One concept at strength 1 with inputs of full column rank therefore merges to exactly dW.

    Report: ``loss`` = the mean squared error over all rows and outputs, sum_i ||X_i (D - dW_i)^T||^2 /
    (out * sum_i n_i); ``pos_dist`` = ||X_i (D - dW_i)^T||_F per concept; ``kept_dims`` / ``unexcited_dims``.
    """
    dtype = resolve_dtype(config.dtype)
    sdtype = resolve_dtype(config.solve_dtype, "solve_dtype")
    check_problem(problem)
    in_full = problem.W0.shape[1]
    xs = rows(problem, "lstsq", dtype, config.device) if has_rows(problem) else None
    deltas = stacked_deltas(problem, dtype, config.device)  # (N, out, in)
    n, out_dim, _ = deltas.shape
    if n == 0:
        zero = torch.zeros_like(problem.W0, dtype=torch.float32)
        return LayerResult(zero, {"loss": None, "converged": True, "pos_dist": []})
    Q = row_basis(xs) if problem.gram is None else None  # (in, K): solve in the rows' span, exactly
    if Q is not None:
        xr = [x @ Q for x in xs]  # (n_i, K)
        stats = GramStats(torch.stack([gram_matrix(x) for x in xr]), [x.shape[0] for x in xr])
        targets = [x @ d.T for x, d in zip(xs, deltas, strict=True)]  # X_i dW_i^T  (n_i, out)
        B = sum((t.T @ x).to(sdtype) for t, x in zip(targets, xr, strict=True))  # (out, K)
    else:
        stats = gram_stats(problem, "lstsq", dtype, config.device, xs=xs)
        Xg = xs if problem.gram is None else None  # the rows behind the Grams
        ones = torch.ones(n, dtype=torch.float64)
        B, _ = rhs_and_const(deltas, stats.gram, Xg, ones, sdtype)  # sum_i dW_i G_i  (out, in)
    in_dim = stats.gram.shape[-1]
    A = gram_sum(stats.gram, None, sdtype)  # sum_i G_i  (in, in)
    if config.ridge > 0:
        eye = torch.eye(in_dim, dtype=sdtype, device=A.device)
        A = A + relative_ridge(A, config.ridge, A.shape[0]) * eye
    sol = solve_quadratic_fro(A, B, 0.0, config.rcond, config.solver)
    D = sol.offset
    if not torch.isfinite(D).all():
        raise ValueError(f"layer {problem.key}: lstsq produced NaN/inf; check the features for this layer")
    if Q is not None:
        sq = torch.tensor(
            [
                float((x @ D.to(x.dtype).T - t).pow(2).sum(dtype=torch.float64))
                for x, t in zip(xr, targets, strict=True)
            ],
            dtype=torch.float64,
        )
    else:
        sq = sq_errors(D, deltas, stats.gram, Xg)  # ||X_i (D - dW_i)^T||^2
    loss = float(sq.sum()) / (out_dim * sum(stats.n_rows))
    if callback is not None:
        callback(problem.key, 0, loss)
    report = {
        "loss": loss,
        "converged": True,
        "steps": 0,
        "pos_dist": [float(v) for v in sq.sqrt()],
        "kept_dims": sol.kept,
        "unexcited_dims": sol.dropped + (in_full - in_dim),
    }
    if Q is not None:
        D = D.to(Q.dtype) @ Q.T  # (out, K) @ (K, in): back from the row space
    return LayerResult(D.to(device=problem.W0.device, dtype=torch.float32), report)


register(
    MergeMethod(
        name="lstsq",
        fn=merge_lstsq,
        config_cls=LstsqConfig,
        needs_features=True,
        reference="Mix-of-Show gradient fusion (Gu et al. 2023, arXiv 2305.18292), solved in closed form",
        summary="least squares over all concepts' features, exact from the Grams",
    )
)
