"""LoRACLR paper mode: the official update, reproduced (objective: :mod:`loraclr.merge.contrastive`).

``mode="paper"``: the official recipe. D = 0 on the base weight; per step the loss of the current D is
evaluated (distances through the expansion ||a||^2 + ||b||^2 - 2 a.b clamped at 1e-12, then sqrt) and
kept if it is the lowest so far, then one full-batch AdamW step (lr 1e-4, weight decay 1e-4, torch's
default betas / eps); 50 steps; the lowest-loss iterate is returned. Distances in fp32: the official fp16
autocast overflows on large blocks (switching the contrastive term off), which is not copied. Needs X.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loraclr.merge._common import common_row_index, resolve_dtype, rows, stacked_deltas
from loraclr.merge.api import Callback, LayerProblem
from loraclr.merge.contrastive.objective import LoraclrConfig, floats


def _expansion_dist(a: Tensor, b: Tensor) -> Tensor:
    """Official pairwise distance: sqrt(clamp(||a||^2 + ||b||^2 - 2 a.b, 1e-12)). a (N, K), b (M, K)."""
    a_sq = a.pow(2).sum(dim=1, keepdim=True)
    b_sq = b.pow(2).sum(dim=1, keepdim=True).T
    return torch.sqrt(torch.clamp(a_sq + b_sq - 2 * a @ b.T, min=1e-12))


def _paper_loss(
    P: Tensor | list[Tensor],
    Y: Tensor | list[Tensor],
    idx: list[Tensor],
    D: Tensor,
    cfg: LoraclrConfig,
    out_dim: int,
) -> tuple[Tensor, dict]:
    """The official loss with autograd. P, Y: stacked (N, n, out) when all concepts have n rows (the
    official case), else lists of (n_i, out). Returns (loss, distances for the report)."""
    n = len(P)
    n_rows = [p.shape[0] for p in P]
    m = min(n_rows)
    equal = isinstance(P, Tensor)
    loss = P[0].new_zeros(())
    info: dict = {}
    if cfg.lambda_con:
        if cfg.distance == "block":
            if equal:
                Kc, Vc = P.reshape(n, -1), Y.reshape(n, -1)  # (N, n*out), official flattening
            else:
                Kc = torch.stack([p[i] for p, i in zip(P, idx, strict=True)]).reshape(n, -1)  # (N, m*out)
                Vc = torch.stack([y[i] for y, i in zip(Y, idx, strict=True)]).reshape(n, -1)
            dist = _expansion_dist(Kc, Vc)  # (N, N)
            if equal:
                pos = torch.diagonal(dist)
            else:
                pos = torch.stack(
                    [
                        _expansion_dist(p.reshape(1, -1), y.reshape(1, -1))[0, 0]
                        for p, y in zip(P, Y, strict=True)
                    ]
                )
            eye = torch.eye(n, dtype=torch.bool, device=dist.device)
            neg = dist.masked_fill(eye, float("inf")).min(dim=1)[0] if n > 1 else None
            if cfg.normalize:
                pos = pos / torch.tensor([math.sqrt(k * out_dim) for k in n_rows], dtype=pos.dtype)
                neg = neg / math.sqrt(m * out_dim) if neg is not None else None
            hinge = (
                torch.clamp(cfg.margin - neg, min=0.0).pow(2) if neg is not None else torch.zeros_like(pos)
            )
            con = (pos.pow(2) + hinge).mean()
            info["pos"] = pos.detach()
            info["neg"] = neg.detach() if neg is not None else None
            info["active"] = float((hinge > 0).float().mean()) if neg is not None else 0.0
        else:
            scale = math.sqrt(out_dim) if cfg.normalize else 1.0
            pos_terms, pos_rms = [], []
            for p, y in zip(P, Y, strict=True):
                d = torch.sqrt(torch.clamp(p.pow(2).sum(1) + y.pow(2).sum(1) - 2 * (p * y).sum(1), min=1e-12))
                d = d / scale  # (n_i,)
                pos_terms.append(d.pow(2).mean())
                pos_rms.append(d.pow(2).mean().sqrt())
            con = torch.stack(pos_terms)
            if n > 1:
                if equal:
                    Pc, Yc = P, Y
                else:
                    Pc = torch.stack([p[i] for p, i in zip(P, idx, strict=True)])  # (N, m, out)
                    Yc = torch.stack([y[i] for y, i in zip(Y, idx, strict=True)])
                cross = torch.einsum("irk,jrk->ijr", Pc, Yc)
                d2 = Pc.pow(2).sum(2)[:, None, :] + Yc.pow(2).sum(2)[None, :, :] - 2 * cross  # (N, N, m)
                d = torch.sqrt(torch.clamp(d2, min=1e-12)) / scale
                eye = torch.eye(n, dtype=torch.bool, device=d.device)[:, :, None]
                neg = d.masked_fill(eye, float("inf")).min(dim=1)[0]  # (N, m)
                hinge = torch.clamp(cfg.margin - neg, min=0.0).pow(2)
                con = con + hinge.mean(1)
                info["neg"] = neg.detach().pow(2).mean(1).sqrt()
                info["active"] = float((hinge > 0).float().mean())
            else:
                info["neg"], info["active"] = None, 0.0
            con = con.mean()
            info["pos"] = torch.stack(pos_rms).detach()
        loss = loss + cfg.lambda_con * con
        info["con"] = float(con.detach())
    if cfg.lambda_mse:
        if equal:
            mse = torch.nn.functional.mse_loss(P, Y)
        else:
            mse = sum((p - y).pow(2).sum() for p, y in zip(P, Y, strict=True)) / (out_dim * sum(n_rows))
        loss = loss + cfg.lambda_mse * mse
        info["mse"] = float(mse.detach())
    if cfg.lambda_reg:
        reg = torch.norm(D, p=2)
        loss = loss + cfg.lambda_reg * reg
        info["reg"] = float(reg.detach())
    return loss, info


def solve_paper(problem: LayerProblem, cfg: LoraclrConfig, callback: Callback | None) -> tuple[Tensor, dict]:
    """The official recipe on one layer: (D, report); see the module docstring."""
    dtype = resolve_dtype(cfg.dtype)
    X = rows(problem, "loraclr (mode='paper')", dtype, cfg.device)
    W0 = problem.W0.to(device=cfg.device, dtype=dtype)
    dW = stacked_deltas(problem, dtype, cfg.device)
    out_dim = W0.shape[0]
    n_rows = [x.shape[0] for x in X]
    idx = common_row_index(n_rows, device=cfg.device)
    equal = len(set(n_rows)) == 1
    with torch.no_grad():
        Y = [x @ (W0 + d).T for x, d in zip(X, dW, strict=True)]  # recorded targets, (n_i, out)
    Xs = torch.stack(X) if equal else None  # (N, n, in)
    if equal:
        Y = torch.stack(Y)  # (N, n, out)
    offset = torch.zeros_like(W0, requires_grad=True)
    opt = torch.optim.AdamW([offset], lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss, best_D, best_step, best_info = math.inf, offset.detach().clone(), 0, {}
    losses = []
    for step in range(cfg.steps):
        opt.zero_grad()
        W = W0 + offset
        P = torch.nn.functional.linear(Xs, W) if equal else [x @ W.T for x in X]
        loss, info = _paper_loss(P, Y, idx, offset, cfg, out_dim)
        value = float(loss.detach())
        losses.append(value)
        if callback is not None:
            callback(problem.key, step, value)
        if value < best_loss:  # official: keep W + offset of the lowest loss seen, *before* the step
            best_loss, best_D, best_step, best_info = value, offset.detach().clone(), step, info
        loss.backward()
        opt.step()
    rel = abs(losses[-1] - losses[-2]) / max(abs(losses[-2]), 1e-300) if len(losses) > 1 else math.inf
    report = {
        "loss": best_loss,
        "loss_terms": {k: best_info.get(k, 0.0) for k in ("con", "mse", "reg")},
        "pos_dist": floats(best_info.get("pos")),
        "neg_dist": floats(best_info.get("neg"), len(X)),
        "hinge_active": best_info.get("active", 0.0),
        "steps": cfg.steps,
        "converged": rel <= cfg.tol,
        "rel_change": rel,
        "best_step": best_step,
        "best_is_last": best_step == cfg.steps - 1,
    }
    return best_D, report
