"""The LoRACLR objective's settings and the coefficients both modes share (see :mod:`loraclr.merge.contrastive`
for the objective). Pure tensor functions (STYLE.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from loraclr.merge._common import check_device, resolve_dtype
from loraclr.merge.linalg import check_solver


@dataclass(frozen=True)
class LoraclrConfig:
    """Settings of the ``loraclr`` method; defaults are the official recipe (objective and 50 AdamW steps).

    mode: "paper" (the official 50 AdamW steps, :mod:`.paper`) or "converged" (the same objective solved
    exactly / to ``tol``, :mod:`.converged`). The field defaults here are the official objective and recipe;
    ``loraclr merge`` recipes that name no mode use the method's registry preset (converged, anchored at the
    mean with a ridge; bench/RESULTS.md has the comparison behind it). Unregularised, the converged solve
    over-fits on the miniature world (offsets far larger than the LoRA deltas, broken images); paper mode's
    small steps under-move, and no hinge fires with its raw distances. margin, lambda_con, lambda_mse,
    lambda_reg: the objective (official 0.5, 1, 0.1, 0.001). distance, normalize: see the module docstring. lr, weight_decay, steps: the paper-mode
    optimiser (AdamW 1e-4, 1e-4, 50). tol, max_iter: converged-mode stopping rule (relative decrease of the
    objective) and cap on majorise-minimise iterations. rcond: eigen-directions of the quadratic part below
    rcond * its largest eigenvalue count as unexcited (D = 0 there). ridge (converged only, default 0 = the
    official objective): adds ridge * e * ||D||_F^2, e = the mean eigenvalue of the quadratic part (the
    layer's feature energy per input direction), so the weight is scale-free across layers. It damps the
    directions that few rows excite, where fitting several concepts' different targets on nearly identical
    inputs asks for offsets far larger than any LoRA delta (what the unregularised solve did on the miniature
    world; ``bench/quality.py`` compares values). anchor: what the offset is measured from. "base" (default,
    the official objective): D is the offset from the base weight, lambda_reg and ridge pull the merged layer
    towards the base, and input directions no concept excites keep the base weight. "sum": the solve runs
    on E = D - sum_i dW_i (the naive sum of deltas, i.e. naive LoRA stacking), so lambda_reg and ridge pull
    towards the sum and unexcited directions keep the sum; the positive, MSE and hinge terms are unchanged
    (they only see W0 + D). A large ridge then gives naive stacking, a small one the exact fit where the
    features pin the weight down. "mean": the same with the mean of the deltas (FedAvg, ``average``) in place
    of their sum. device, dtype: where and in which precision features are multiplied (fp32 default);
    solve_dtype: precision of the (in, in) solves.
    solver: "auto" (default) solves with Cholesky factorisations when a shifted factorisation proves that no
    eigen-direction falls below the rcond cut-off, else eigen-solves; "eigh" always eigen-solves (the
    reference; :class:`loraclr.merge.linalg.QuadSolver`). Both give the same minimiser up to rounding.
    """

    mode: str = "paper"
    margin: float = 0.5
    lambda_con: float = 1.0
    lambda_mse: float = 0.1
    lambda_reg: float = 0.001
    distance: str = "block"
    normalize: bool = False
    lr: float = 1e-4
    weight_decay: float = 1e-4
    steps: int = 50
    tol: float = 1e-7
    max_iter: int = 200
    rcond: float = 1e-6
    ridge: float = 0.0
    anchor: str = "base"
    device: str = "cpu"
    dtype: str = "float32"
    solve_dtype: str = "float64"
    solver: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "converged"):
            raise ValueError(f"mode must be 'paper' or 'converged', got {self.mode!r}")
        if self.anchor not in ("base", "sum", "mean"):
            raise ValueError(f"anchor must be 'base', 'sum' or 'mean', got {self.anchor!r}")
        if self.distance not in ("block", "token"):
            raise ValueError(f"distance must be 'block' or 'token', got {self.distance!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        for name in ("margin", "lambda_con", "lambda_mse", "lambda_reg", "weight_decay", "ridge"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("steps", "max_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 < self.tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {self.tol!r}")
        if not 0 <= self.rcond < 1:
            raise ValueError(f"rcond must be in [0, 1), got {self.rcond!r}")
        if self.ridge and self.mode == "paper":
            raise ValueError("ridge is a converged-mode option (paper mode reproduces the official recipe)")
        resolve_dtype(self.dtype)
        resolve_dtype(self.solve_dtype, "solve_dtype")
        check_solver(self.solver)
        check_device(self.device)


@dataclass
class Weights:
    """Coefficients turning the objective into sums of squared norms (see :func:`objective_weights`)."""

    a_pos: Tensor  # (N,) weight of ||X_i (D - dW_i)^T||^2 from the positive term
    a_mse: float  # weight of the same from the MSE term
    w_hinge: float  # weight of each hinge term relu(mu - d_raw)^2
    mu: float  # margin in raw (unnormalised) distance units
    pos_scale: Tensor  # (N,) divide raw squared positive sums by this to report the objective's distance
    neg_scale: float  # divide raw negative distances by sqrt of this


def objective_weights(cfg: LoraclrConfig, n_rows: list[int], out_dim: int) -> Weights:
    """The objective as weighted sums of squared norms, for ``n_rows`` rows per concept and ``out_dim`` outputs."""
    n = len(n_rows)
    m = min(n_rows)
    nr = torch.tensor(n_rows, dtype=torch.float64)
    if cfg.distance == "block":
        s_pos, s_neg = nr * out_dim, float(m * out_dim)  # values per compared block
        a_pos = torch.full((n,), cfg.lambda_con / n, dtype=torch.float64)
        w_h = cfg.lambda_con / n
        pos_scale = torch.ones(n, dtype=torch.float64)
    else:
        s_pos, s_neg = torch.full((n,), float(out_dim), dtype=torch.float64), float(out_dim)
        a_pos = cfg.lambda_con / (n * nr)  # mean over the n_i rows
        w_h = cfg.lambda_con / (n * m)  # mean over the m common rows
        pos_scale = nr.clone()  # report RMS over rows
    if cfg.normalize:
        a_pos = a_pos / s_pos
        w_h = w_h / s_neg
        pos_scale = pos_scale * s_pos
        mu = cfg.margin * math.sqrt(s_neg)  # relu(margin - d / sqrt(s))^2 = relu(margin sqrt(s) - d)^2 / s
        neg_scale = s_neg
    else:
        mu, neg_scale = cfg.margin, 1.0
    a_mse = cfg.lambda_mse / (out_dim * float(nr.sum()))
    return Weights(a_pos, a_mse, w_h, mu, pos_scale, neg_scale)


def floats(t: Tensor | None, n: int | None = None) -> list:
    """A tensor as a list of floats for a report; None -> ``n`` Nones (or [])."""
    if t is None:
        return [None] * n if n is not None else []
    return [float(v) for v in t]
