"""How faithful a merged layer is to each concept, on the concept's own features: a diagnostic the merge
reports per layer and per concept. A pure tensor function (STYLE.md); shapes as in :mod:`loraclr.merge.api`."""

from __future__ import annotations

import torch
from torch import Tensor

from loraclr.merge._common import summed_deltas
from loraclr.merge.api import LayerProblem

FIDELITY_ROWS = 256  # rows per concept behind the fidelity numbers (see fidelity)


def fidelity(problem: LayerProblem, offset: Tensor,
             max_rows: int | None = FIDELITY_ROWS) -> dict[str, list[float]] | None:
    """Per concept i, on its own rows X_i: ||X_i (D - dW_i)^T|| / ||X_i (W0 + dW_i)^T|| for the merged offset
    D and for the naive sum of deltas (the 'before merging' stacking). None without rows.

    A diagnostic, so it uses at most ``max_rows`` rows per concept, evenly spaced over the block (None: all):
    three (rows x in x out) products per concept and layer would otherwise cost more than the solve itself.
    The subsample moves the per-concept means that the summary reports only slightly (bench/RESULTS.md)."""
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
