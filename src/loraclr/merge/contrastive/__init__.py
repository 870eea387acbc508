"""``loraclr``: the LoRACLR contrastive merge of one layer (Simsar et al., CVPR 2025, arXiv 2412.09622).

Objective (official code ``enisimsar/LoRACLR`` ``weight_fusion.py:update_contrastive``).
For concepts i = 1..N with inputs X_i (n_i, in), deltas dW_i and one shared offset D (out, in):

    P_i = X_i (W0 + D)^T                 prediction of the merged layer      (n_i, out)
    Y_i = X_i (W0 + dW_i)^T              concept i's own LoRA model output    (n_i, out)
    dist[i, j] = || vec(P_i) - vec(Y_j) ||_2
    L_con = mean_i ( dist[i, i]^2 + relu(margin - min_{j != i} dist[i, j])^2 )     (LoRACLR eq. for L_con)
    L     = lambda_con * L_con + lambda_mse * MSE(P, Y) + lambda_reg * ||D||_F       (||D||_F not squared)

Options (both modes; defaults reproduce the official objective):

- ``distance="block"``: dist as above, one positive and one hardest negative per concept (N hinge terms).
  ``distance="token"``: per-row distances d_pos[i, r] = ||P_i[r] - Y_i[r]||,
  d_neg[i, r] = min_{j != i} ||P_i[r] - Y_j[r]||, and
  L_con = mean_i ( mean_r d_pos[i, r]^2 + mean_r relu(margin - d_neg[i, r])^2 )  (N * m hinge terms).
- ``normalize=True``: every distance is divided by the square root of the number of values it compares
  (rows * out for a block, out for a row), i.e. it becomes an RMS difference per output value, so that a
  margin of 0.5 has the same meaning at every layer size. ``normalize=False`` is the official, raw norm.

Unequal row counts (prompts that tokenise to different lengths): positives and the MSE use all rows of
each concept (the MSE is the mean over all rows of all concepts); negatives compare blocks on a common
m = min_i n_i rows, taken evenly spaced in each block (:func:`loraclr.merge._common.common_row_index`).
With equal row counts this is exactly the official stacking.

Modes (one module each; the settings and the coefficients they share: :mod:`.objective`):

- ``mode="paper"`` (:mod:`.paper`): the official recipe, 50 AdamW steps from D = 0. Needs X.
- ``mode="converged"`` (:mod:`.converged`): the same objective solved to a relative tolerance (closed form,
  then majorise-minimise while a hinge is active). Needs the Grams (from ``gram`` or ``X``) and, for the
  negatives, the raw rows X.

Report (JSON-serialisable): ``loss`` (final objective), ``loss_terms`` (con, mse, reg), ``pos_dist`` and
``neg_dist`` per concept (the objective's distance; for ``token``: root-mean-square over rows),
``hinge_active`` (fraction of active hinge terms), ``steps``, ``converged``, ``rel_change``; ``paper``
adds ``best_step`` and ``best_is_last`` (whether the best iterate was the last one evaluated).
"""

from __future__ import annotations

import dataclasses

import torch

from loraclr.merge._common import check_problem, summed_deltas
from loraclr.merge.api import Callback, LayerProblem, LayerResult, MergeMethod, register
from loraclr.merge.contrastive.converged import lowrank_applies, solve_converged, solve_lowrank
from loraclr.merge.contrastive.objective import LoraclrConfig
from loraclr.merge.contrastive.paper import solve_paper

__all__ = ["LoraclrConfig", "merge_loraclr"]


def merge_loraclr(
    problem: LayerProblem, config: LoraclrConfig, callback: Callback | None = None
) -> LayerResult:
    """Merge one layer with LoRACLR (module docstring). ``paper`` needs X; ``converged`` needs X or gram."""
    n, out_dim, in_dim = check_problem(problem)
    if n == 0:
        zero = torch.zeros_like(problem.W0, dtype=torch.float32)
        return LayerResult(
            zero,
            {
                "loss": None,
                "converged": True,
                "pos_dist": [],
                "neg_dist": [],
                "hinge_active": 0.0,
                "steps": 0,
            },
        )
    if config.mode == "converged" and lowrank_applies(problem, config):
        fast = solve_lowrank(problem, config)
        if fast is not None:
            D, report = fast
            if callback is not None:
                callback(problem.key, 0, report["loss"])
            return LayerResult(D.to(device=problem.W0.device, dtype=torch.float32), report)
    anchor = None
    if config.anchor in ("sum", "mean"):  # solve for E = D - anchor: the same outputs, measured from the anchor
        anchor = summed_deltas(problem, torch.float32, problem.W0.device)
        if config.anchor == "mean":
            anchor = anchor / max(1, len(problem.deltas))
        problem = dataclasses.replace(problem, W0=problem.W0.float() + anchor, ranks=None,  # dense now
                                      deltas=[d.float() - anchor for d in problem.deltas])
    if config.mode == "paper":
        D, report = solve_paper(problem, config, callback)
    else:
        D, report = solve_converged(problem, config, callback)
    if anchor is not None:
        D = D.to(device=anchor.device, dtype=torch.float32) + anchor
        report["anchor"] = config.anchor
    if not torch.isfinite(D).all():
        raise ValueError(
            f"layer {problem.key}: loraclr ({config.mode}) produced NaN/inf; check this layer's features "
            "(NaN/inf or extreme values) and the lambdas"
        )
    return LayerResult(D.to(device=problem.W0.device, dtype=torch.float32), report)


register(
    MergeMethod(
        name="loraclr",
        fn=merge_loraclr,
        config_cls=LoraclrConfig,
        needs_features=True,
        reference="LoRACLR, Simsar et al., CVPR 2025 (arXiv 2412.09622); official code enisimsar/LoRACLR weight_fusion.py",
        summary="contrastive merge: positives attract, hardest negatives repelled beyond a margin",
        label="LoRACLR merge",
        # what a recipe naming no mode gets: the setting bench/quality.py scores best (bench/RESULTS.md);
        # converged, and anchored at the mean of the deltas with a ridge, so it never falls below averaging
        preset={"mode": "converged", "anchor": "mean", "ridge": 0.1},
    )
)
