"""How faithful a merged layer is to each concept, on the concept's own features: a diagnostic the merge
reports per layer and per concept. A pure tensor function (STYLE.md); shapes as in :mod:`loraclr.merge.api`."""

from __future__ import annotations

import torch
from torch import Tensor

from loraclr.merge._common import summed_deltas
from loraclr.merge.api import LayerProblem, LowRankDeltas

FIDELITY_ROWS = 256  # rows per concept behind the fidelity numbers (see fidelity)


def _delta_products(X: Tensor, deltas: LowRankDeltas, i: int) -> tuple[Tensor, Tensor]:
    """(X @ dW_i^T, X @ (sum_j dW_j)^T), (rows, out) each, from the LoRA factors: X's product with the stacked
    downs, then with concept i's scaled up and with all of them, so no dense (out, in) delta is built and the
    products are rows x in x (sum of ranks) instead of rows x in x out."""
    ranks = [int(d.shape[0]) for d in deltas.downs]
    XA = X @ torch.cat([d.float() for d in deltas.downs]).T  # (rows, sum of ranks)
    ups = torch.cat([u.float() * s for u, s in zip(deltas.ups, deltas.scales, strict=True)], 1)  # (out, sum)
    a = sum(ranks[:i])
    return XA[:, a:a + ranks[i]] @ ups[:, a:a + ranks[i]].T, XA @ ups.T


def fidelity(problem: LayerProblem, offset: Tensor,
             max_rows: int | None = FIDELITY_ROWS) -> dict[str, list[float]] | None:
    """Per concept i, on its own rows X_i: ||X_i (D - dW_i)^T|| / ||X_i (W0 + dW_i)^T|| for the merged offset
    D and for the naive sum of deltas (the 'before merging' stacking). None without rows.

    A diagnostic, so it uses at most ``max_rows`` rows per concept, evenly spaced over the block (None: all):
    the (rows x in x out) products per concept and layer would otherwise cost more than the solve itself. Of
    those, only X W0^T and X D^T remain dense (in one product); the deltas' products use their LoRA factors
    (:func:`_delta_products`). The subsample moves the per-concept means that the summary reports only
    slightly (bench/RESULTS.md)."""
    if not problem.X or any(x is None for x in problem.X):
        return None
    D = offset.reshape(offset.shape[0], -1).float()
    base_and_merged = torch.cat([problem.W0.float(), D]).T  # (in, 2 out): one product for both
    out = D.shape[0]
    factored = isinstance(problem.deltas, LowRankDeltas)
    total_delta = None if factored else summed_deltas(problem, torch.float32, D.device)
    merged, summed = [], []
    for i, X in enumerate(problem.X):
        if max_rows and X.shape[0] > max_rows:
            X = X[torch.linspace(0, X.shape[0] - 1, max_rows).round().long()]
        X = X.float()
        XB = X @ base_and_merged
        if factored:
            own, total = _delta_products(X, problem.deltas, i)
        else:
            own, total = X @ problem.deltas[i].float().T, X @ total_delta.T
        target = (XB[:, :out] + own).norm().clamp_min(1e-12)
        merged.append(float((XB[:, out:] - own).norm() / target))
        summed.append(float((total - own).norm() / target))
    return {"merged": merged, "sum": summed}
