"""LoRACLR converged mode: the official objective solved to a tolerance (objective:
:mod:`loraclr.merge.contrastive`).

``mode="converged"``: the same objective solved to a relative tolerance. Everything but the hinge is
quadratic in D and depends on the data only through G_i = X_i^T X_i and dW_i, and the non-squared
||D||_F is handled exactly (:func:`loraclr.merge.linalg.solve_quadratic_fro`). The solver:
1. minimises the convex part (positives + MSE + lambda_reg ||D||_F) in closed form;
2. evaluates every negative distance exactly at that D; if no hinge is active, that D is the global
   minimiser of L (L >= its convex part everywhere, with equality there) and the solve stops;
3. otherwise majorise-minimise: each active hinge term relu(mu - ||v||)^2, v = vec(P_i - Y_j*), is
   replaced by its upper bound ||v - mu * v_k / ||v_k|| ||^2 (exact at the current v_k, valid for all v),
   the resulting convex surrogate is minimised in closed form, and a line search on the true L
   (halving from the full step, or doubling while L keeps falling) keeps every step a descent step.
   It stops when the relative decrease of L falls below ``tol`` (``converged``), or at ``max_iter``;
   a fixed point is a stationary point of L (the hinge makes L non-convex, so not necessarily global).
When all concepts together have fewer rows than the layer has inputs (text encoder, cross-attention
k/v), the problem is solved exactly in the span of the rows (an (rows x rows) instead of (in x in)
solve). Cost with n rows per concept, N concepts: Grams N n in^2, one in^3 solve (a few Cholesky
factorisations when the rcond cut-off provably removes nothing, else an eigen-solve:
:class:`loraclr.merge.linalg.QuadSolver`), two products N n in out for the exact negative distances,
plus one product per majorise-minimise step and one in^3 solve each time the set of active hinges
changes; the official recipe costs about 100 products N n in out (50 x forward+backward).
It needs the Grams (from ``gram`` or ``X``) and, for the negatives, the raw rows X. With Grams only and
equal row counts, block distances are bounded below by | ||P_i|| - ||Y_j|| | (both norms come from the
Grams); if that certifies every hinge inactive the closed form is the exact answer, else it raises.
LoRA factors: when the deltas come as :class:`loraclr.merge.api.LowRankDeltas` (what ``loraclr merge``
passes) of total rank R < out, steps 1-2 run in factored form (:func:`solve_lowrank`: the right-hand side
is U M with U the scaled ups, so D = U Z with R instead of out right-hand sides, one base-output product
serves predictions and targets, and fewer rows than inputs are solved in their span as above); the same
minimiser. If a hinge is active there, the dense path above takes over.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loraclr.merge._common import (
    GramStats,
    common_row_index,
    gram_stats,
    has_rows,
    resolve_dtype,
    rhs_and_const,
    rows,
    sq_errors,
    stacked_deltas,
)
from loraclr.merge.api import Callback, LayerProblem, LowRankDeltas
from loraclr.merge.contrastive.objective import LoraclrConfig, Weights, floats, objective_weights
from loraclr.merge.linalg import (
    QuadSolver,
    gram_matrix,
    gram_sum,
    gram_sum_rows,
    relative_ridge,
    row_basis,
    symmetrize,
)


class _Converged:
    """One layer's objective in the form the converged solver needs (see module docstring).

    L(D) = tr(D A0 D^T) - 2 <D, B0> + c0          positives + MSE, A0 = sum_i a_i G_i, B0 = sum_i a_i dW_i G_i
         + w_h * sum_active relu(mu - d)^2         hinges, from predictions P on the common rows
         + lambda_reg * ||D||_F
    The quadratic part is kept in the solve dtype; predictions and distances in the compute dtype.
    When all concepts together have fewer rows than inputs (text-encoder and cross-attention layers), D is
    solved in the span of the rows (D_full = D Q^T, see ``row_basis``): exact, since predictions only see
    that span and the regulariser pushes D to 0 outside it. Products with the deltas and W0 stay in the
    original coordinates (RW0, Tc), so no delta is ever rotated.
    """

    def __init__(self, problem: LayerProblem, cfg: LoraclrConfig):
        self.cfg, self.key = cfg, problem.key
        dtype = resolve_dtype(cfg.dtype)
        sd = self.sdtype = resolve_dtype(cfg.solve_dtype, "solve_dtype")
        xs = rows(problem, "loraclr", dtype, cfg.device) if has_rows(problem) else None
        # D lives in solve coordinates: D_full = D Q^T when the rows span fewer dims than the inputs
        self.Q = row_basis(xs) if problem.gram is None else None  # (in, K) or None
        xr = [x @ self.Q for x in xs] if self.Q is not None else xs  # rows in solve coordinates
        if self.Q is not None:
            stats = GramStats(torch.stack([gram_matrix(x) for x in xr]), [x.shape[0] for x in xr])
        else:
            stats = gram_stats(problem, "loraclr (mode='converged')", dtype, cfg.device, xs=xs)
        self.n_rows, self.N = stats.n_rows, len(stats.n_rows)
        self.W0 = problem.W0.to(device=cfg.device, dtype=dtype)  # (out, in), original coordinates
        self.dW = stacked_deltas(problem, dtype, cfg.device)  # (N, out, in), original coordinates
        self.out_dim = self.W0.shape[0]
        self.in_dim = stats.gram.shape[-1]  # solve dimension (K or in)
        self.w = objective_weights(cfg, self.n_rows, self.out_dim)
        self.G = stats.gram  # (N, k, k), compute dtype
        self.X, self.Xr = xs, xr
        self.grams_from_rows = problem.gram is None
        a = (self.w.a_pos + self.w.a_mse).to(device=cfg.device, dtype=sd)  # (N,)
        self.A0 = gram_sum(self.G, a.tolist(), sd)
        # relative ridge: ridge * (mean feature energy per input direction) * ||D||_F^2, folded into A0 so the
        # closed forms, the majoriser and the line search all see it (trace is basis-independent)
        self.ridge_abs = relative_ridge(self.A0, cfg.ridge, problem.W0.shape[1])
        if self.ridge_abs > 0:
            self.A0 = self.A0 + self.ridge_abs * torch.eye(self.A0.shape[0], dtype=sd, device=cfg.device)
        if self.Q is not None:  # B0 = sum_i a_i (X_i dW_i^T)^T (X_i Q): deltas never change basis
            self.B0 = torch.zeros(self.out_dim, self.in_dim, dtype=sd, device=cfg.device)
            self.c0 = 0.0
            for i in range(self.N):
                T = xs[i] @ self.dW[i].T  # (n_i, out)
                self.B0 += float(a[i]) * (T.T @ xr[i]).to(sd)
                self.c0 += float(a[i]) * float(T.pow(2).sum(dtype=torch.float64))
        else:
            Xg = self.X if self.grams_from_rows else None  # rows behind the Grams, if they are the same
            self.B0, self.c0 = rhs_and_const(self.dW, self.G, Xg, a, sd)
        self.needs_hinge = cfg.lambda_con > 0 and self.N > 1
        self.R = self.Rr = self.Tc = None
        self._RW0: Tensor | None = None
        self.rows_are_gram_rows = False  # True: R holds every row behind the Grams, in order
        self._Gc: dict[int, Tensor] = {}
        self._solver_key: bytes | None = None  # active-hinge pattern behind self._solver's A
        self._solver: QuadSolver | None = None
        if self.X is not None:
            x_rows = [x.shape[0] for x in self.X]
            idx = common_row_index(x_rows, device=cfg.device)
            self.m = min(x_rows)
            if len(set(x_rows)) == 1:
                self.R = torch.stack(self.X)  # (N, m, in): all rows are common
            else:
                self.R = torch.stack([x[i] for x, i in zip(self.X, idx, strict=True)])  # (N, m, in)
            self.Rr = self.R @ self.Q if self.Q is not None else self.R  # (N, m, k)
            self.Tc = torch.einsum("nri,noi->nro", self.R, self.W0 + self.dW)  # (N, m, out) targets
            self.rows_are_gram_rows = problem.gram is None and len(set(x_rows)) == 1
            if problem.gram is not None:
                # the rows may be a subsample of those behind the Grams: hinge weights count the rows used
                self.w.w_hinge, self.w.mu, self.w.neg_scale = _hinge_weights(
                    cfg, self.N, self.m, self.out_dim
                )
        else:
            self.m = min(self.n_rows)
            if self.needs_hinge and (cfg.distance == "token" or len(set(self.n_rows)) > 1):
                what = "per-row distances" if cfg.distance == "token" else "blocks of different row counts"
                raise ValueError(
                    f"layer {self.key}: loraclr with distance={cfg.distance!r} needs the raw rows X for the "
                    f"negative distances (only Grams were collected, and they cannot bound {what}); keep rows "
                    "for this layer, or set lambda_con to 0"
                )

    def Gc(self, i: int) -> Tensor:
        """R_i^T R_i over the common rows (solve dtype), cached."""
        if i not in self._Gc:
            g = self.G[i] if self.rows_are_gram_rows else gram_matrix(self.Rr[i])
            self._Gc[i] = g.to(self.sdtype)
        return self._Gc[i]

    @property
    def RW0(self) -> Tensor:
        """Base outputs R W0^T on the common rows (N, m, out), formed on first use."""
        if self._RW0 is None:
            self._RW0 = self.R @ self.W0.T
        return self._RW0

    def predict(self, D: Tensor) -> Tensor:
        """P = R (W0 + D_full)^T on the common rows, (N, m, out); D in solve coordinates."""
        if self.Q is None:  # one product with the rows
            return torch.einsum("nri,oi->nro", self.R, self.W0 + D.to(self.W0.dtype))
        return self.RW0 + torch.einsum("nrk,ok->nro", self.Rr, D.to(self.W0.dtype))

    def hinge(self, P: Tensor) -> tuple[Tensor, Tensor, float]:
        """Hardest negatives at predictions P: (raw distances, argmin j, sum of squared hinges)."""
        if self.cfg.distance == "block":
            neg, j = _block_hardest(P, self.Tc, self.w.mu)
        else:
            neg, j = _token_hardest(P, self.Tc)
        return neg, j, float(torch.clamp(self.w.mu - neg, min=0).pow(2).sum())

    def gram_bound(self, D: Tensor) -> tuple[Tensor, Tensor]:
        """Grams only (block, equal rows): | ||P_i|| - ||Y_j|| | <= dist[i, j], both norms from the Grams."""
        G = self.G.to(self.sdtype)
        Wd = self.W0.to(self.sdtype) + D
        p_norm = torch.einsum("oi,nij,oj->n", Wd, G, Wd).clamp(min=0).sqrt()
        Wt = self.W0.to(self.sdtype).unsqueeze(0) + self.dW.to(self.sdtype)
        t_norm = torch.einsum("noi,nij,noj->n", Wt, G, Wt).clamp(min=0).sqrt()
        lb = (p_norm[:, None] - t_norm[None, :]).abs()
        lb.fill_diagonal_(math.inf)
        return lb.min(dim=1)

    def surrogate(self, P: Tensor, neg: Tensor, jstar: Tensor) -> tuple[QuadSolver, Tensor]:
        """(solver for A, B) of the convex majoriser tr(D A D^T) - 2 <D, B> (+ lambda_reg ||D||_F) at
        predictions P. A depends only on which hinge terms are active: its factorisation is reused while
        that set stays the same (the usual case once the iterations settle)."""
        w, sd = self.w, self.sdtype
        active = neg < w.mu
        key = active.cpu().numpy().tobytes()
        A = None if key == self._solver_key else self.A0.clone()
        B = self.B0.clone()
        for i in range(self.N):
            if self.cfg.distance == "block":
                if not bool(active[i]):
                    continue
                R, RW0, Tj = self.Rr[i], self.RW0[i], self.Tc[int(jstar[i])]  # (m, k), (m, out), (m, out)
                diff = P[i] - Tj
                d = float(neg[i])
                U = diff / d if d > 1e-30 else _fallback_dir(self.Tc[i] - Tj, diff)
                if A is not None:
                    A += w.w_hinge * self.Gc(i)
            else:
                sel = active[i]  # (m,)
                if not bool(sel.any()):
                    continue
                R, RW0 = self.Rr[i][sel], self.RW0[i][sel]
                Tj = self.Tc[jstar[i][sel], torch.nonzero(sel).squeeze(1)]  # (k, out)
                diff = P[i][sel] - Tj
                U = diff / neg[i][sel].clamp(min=1e-30).unsqueeze(1).to(diff.dtype)
                if A is not None:
                    A += w.w_hinge * (R.T @ R).to(sd)
            Zp = Tj + w.mu * U - RW0  # majoriser's target minus the base output  (rows, out)
            B += w.w_hinge * (Zp.T @ R).to(sd)
        if A is not None:
            self._solver_key, self._solver = key, QuadSolver(symmetrize(A), self.cfg.rcond, self.cfg.solver)
        return self._solver, B

    def per_concept_sq(self, D: Tensor) -> Tensor:
        """||X_i (D - dW_i)^T||^2 per concept (float64), for the report."""
        if self.Q is not None:  # rows in solve coordinates against X_i dW_i^T
            return torch.tensor(
                [
                    float((x @ D.to(x.dtype).T - x0 @ d.T).pow(2).sum(dtype=torch.float64))
                    for x, x0, d in zip(self.Xr, self.X, self.dW, strict=True)
                ],
                dtype=torch.float64,
            )
        return sq_errors(D, self.dW, self.G, self.X if self.grams_from_rows else None)


def _hinge_weights(cfg: LoraclrConfig, n: int, m: int, out_dim: int) -> tuple[float, float, float]:
    w = objective_weights(cfg, [m] * n, out_dim)
    return w.w_hinge, w.mu, w.neg_scale


def _fallback_dir(primary: Tensor, other: Tensor) -> Tensor:
    """Unit direction for a prediction sitting exactly on a negative target (gradient undefined there)."""
    for v in (primary, other):
        nv = float(v.norm())
        if nv > 0:
            return v / nv
    return torch.zeros_like(primary)


def _block_hardest(P: Tensor, T: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """Hardest-negative distance per anchor between flattened blocks, accurate near the margin.

    The expansion ||a||^2 + ||b||^2 - 2 a.b cancels catastrophically for large blocks (squared norms ~1e7
    against a margin of 0.5); pairs that it puts anywhere near the margin are recomputed directly.
    P, T: (N, m, out). Returns (N,) distances (float64) and (N,) argmin j (j != i).
    """
    n = P.shape[0]
    Pf, Tf = P.reshape(n, -1), T.reshape(n, -1)
    # squared block norms: float32 norms of the rows, summed in float64 (as accurate as a float64 sum of squares
    # at a tenth of its cost: no float64 copy of the blocks)
    pn = torch.linalg.vector_norm(P, dim=-1).double().pow(2).sum(1)
    tn = torch.linalg.vector_norm(T, dim=-1).double().pow(2).sum(1)
    d2 = pn[:, None] + tn[None, :] - 2 * (Pf @ Tf.T).double()
    slack = 1e-4 * (pn[:, None] + tn[None, :])  # far above the rounding error of the expansion
    near = d2 < (mu * mu + slack)
    near.fill_diagonal_(False)
    for i, j in torch.nonzero(near).tolist():
        d2[i, j] = (Pf[i].double() - Tf[j].double()).pow(2).sum()
    d2 = d2.clamp(min=0)
    d2.fill_diagonal_(math.inf)
    best, j = d2.min(dim=1)
    return best.sqrt(), j


def _token_hardest(P: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row hardest negative: (N, m) distances and argmin j, through the row-wise expansion in float64
    (rows are short, so this is cheap next to computing P)."""
    n = P.shape[0]
    Pd, Td = P.double(), T.double()
    cross = torch.einsum("irk,jrk->ijr", Pd, Td)
    d2 = Pd.pow(2).sum(2)[:, None, :] + Td.pow(2).sum(2)[None, :, :] - 2 * cross  # (N, N, m)
    d2 = d2.clamp(min=0)
    eye = torch.eye(n, dtype=torch.bool, device=P.device)[:, :, None]
    d2 = d2.masked_fill(eye, math.inf)
    best, j = d2.min(dim=1)
    return best.sqrt(), j


def _line_point(S: _Converged, line: tuple, s: float) -> tuple:
    """Objective at D + s * delta: the quadratic part is a parabola in s and P moves linearly."""
    P, Pd, q, g1, h2, D, delta = line
    neg, j, hinge_sum = S.hinge(P + s * Pd)
    loss = (
        q + s * g1 + s * s * h2 + S.w.w_hinge * hinge_sum + S.cfg.lambda_reg * float((D + s * delta).norm())
    )
    return s, neg, j, loss


def _converged_report(cfg: LoraclrConfig, w: Weights, sq: Tensor, neg: Tensor | None, hinge_term: float,
                      d_norm: float, ridge_abs: float, out_dim: int, n_rows: list[int], *, steps: int,
                      converged: bool, rel: float, note: str) -> dict:
    """The converged solve's report (module docstring) from the per-concept squared errors ``sq`` on all rows,
    the hardest-negative distances ``neg`` (raw; None without negatives), the hinge term and ||D||_F (D in the
    solve's variable: the offset from the anchor). The loss comes from the residuals, not from the quadratic
    form's value, which cancels to a small rest when the fit is good."""
    loss = float(((w.a_pos + w.a_mse) * sq).sum()) + hinge_term + cfg.lambda_reg * d_norm
    con_raw = float((w.a_pos * sq).sum()) + hinge_term
    if neg is None:
        neg_rep, active = [None] * len(sq), 0.0
    else:
        active = float((neg < w.mu).double().mean()) if cfg.lambda_con > 0 else 0.0
        negn = neg / math.sqrt(w.neg_scale)
        neg_rep = floats(negn if cfg.distance == "block" else negn.pow(2).mean(1).sqrt())
    report = {
        "loss": loss,
        "loss_terms": {
            "con": con_raw / cfg.lambda_con if cfg.lambda_con else 0.0,
            "mse": float(sq.sum()) / (out_dim * sum(n_rows)),
            "reg": d_norm,
        },
        "pos_dist": floats((sq / w.pos_scale).sqrt()),
        "neg_dist": neg_rep,
        "hinge_active": active,
        "steps": steps,
        "converged": converged,
        "rel_change": rel,
        "note": note,
    }
    if ridge_abs > 0:  # the extra term the solve minimised on top of the official objective ("loss")
        report["ridge_term"] = ridge_abs * d_norm**2
    return report


def solve_converged(
    problem: LayerProblem, cfg: LoraclrConfig, callback: Callback | None
) -> tuple[Tensor, dict]:
    """The dense converged solve of one layer: (D, report); see the module docstring."""
    S = _Converged(problem, cfg)
    w, lam = S.w, cfg.lambda_reg
    sol = QuadSolver(S.A0, cfg.rcond, cfg.solver).solve(S.B0, lam)  # minimiser of the convex part
    D, q = sol.offset, sol.quad + S.c0
    neg = jstar = P = None
    hinge_sum, bound = 0.0, False
    if S.needs_hinge and S.R is not None:
        P = S.predict(D)
        neg, jstar, hinge_sum = S.hinge(P)
    elif S.needs_hinge:
        neg, jstar = S.gram_bound(D)
        bound = True
        if bool((neg < w.mu).any()):
            raise ValueError(
                f"layer {S.key}: loraclr needs the raw rows X here: with Grams only, some negative distances "
                "cannot be shown to exceed the margin; keep rows for this layer"
            )
    loss = q + w.w_hinge * hinge_sum + lam * float(D.norm())
    if callback is not None:
        callback(problem.key, 0, loss)
    steps, rel, converged, note = 1, 0.0, False, ""
    if neg is None or bound or not bool((neg < w.mu).any()):
        converged, note = True, "closed form (no active hinge: global minimum)"
    else:
        DA0 = D @ S.A0
        for it in range(cfg.max_iter):
            solver, B = S.surrogate(P, neg, jstar)
            delta = solver.solve(B, lam).offset - D
            if float(delta.norm()) <= 1e-12 * max(float(D.norm()), 1e-30):
                converged, note, rel = True, "surrogate fixed point", 0.0
                break
            # along the segment the quadratic part is a parabola and P moves linearly: no re-multiplication
            dA0 = delta @ S.A0
            g1 = 2 * float((delta * DA0).sum() - (delta * S.B0).sum())
            h2 = float((dA0 * delta).sum())
            Pd = torch.einsum("nrk,ok->nro", S.Rr, delta.to(S.W0.dtype))
            line = (P, Pd, q, g1, h2, D, delta)
            s, accepted = 1.0, None
            for _ in range(40):
                cand = _line_point(S, line, s)
                if cand[3] <= loss:
                    accepted = cand
                    break
                s *= 0.5
            # the majoriser's curvature is conservative, so full steps are often short: try longer ones
            # (each try costs only distances, not a product with the rows)
            while accepted is not None and accepted[0] >= 1.0 and accepted[0] < 64:
                cand = _line_point(S, line, accepted[0] * 2)
                if cand[3] >= accepted[3]:
                    break
                accepted = cand
            steps += 1
            if accepted is None:  # no decrease representable in floating point: a stationary point
                converged, note, rel = True, "line search found no decrease (numerical optimum)", 0.0
                break
            s, neg, jstar, loss_new = accepted
            D = D + s * delta
            DA0 = DA0 + s * dA0
            q = q + s * g1 + s * s * h2
            P = P + s * Pd if (it + 1) % 20 else S.predict(D)  # refresh now and then against drift
            rel = (loss - loss_new) / max(abs(loss), 1e-300)
            loss = loss_new
            if callback is not None:
                callback(problem.key, steps - 1, loss)
            if rel <= cfg.tol:
                converged, note = True, f"relative decrease {rel:.2e} <= tol"
                break
        else:
            note = f"max_iter={cfg.max_iter} reached (relative decrease {rel:.2e})"
    # exact values at the final D for the report (P refreshed after iterations; per-concept errors)
    if S.R is not None and S.N > 1 and (P is None or steps > 1):
        P = S.predict(D)
        neg, jstar, hinge_sum = S.hinge(P)
    if P is not None and S.rows_are_gram_rows:  # P - Tc = X_i (D - dW_i)^T on all rows: no new product
        sq = (P - S.Tc).pow(2).sum(dim=(1, 2), dtype=torch.float64).cpu()
    else:
        sq = S.per_concept_sq(D)
    hinge_term = w.w_hinge * hinge_sum if S.needs_hinge else 0.0
    report = _converged_report(cfg, w, sq, neg, hinge_term, float(D.norm()), S.ridge_abs, S.out_dim, S.n_rows,
                               steps=steps, converged=converged, rel=rel, note=note)
    if bound:
        report["neg_dist_is_lower_bound"] = True
    if S.Q is not None:
        D = D.to(S.Q.dtype) @ S.Q.T  # back from the row space: (out, k) @ (k, in)
    return D, report


# --- the LoRA-factor path -----------------------------------------------------------------------------------


def lowrank_applies(problem: LayerProblem, cfg: LoraclrConfig) -> bool:
    """The factored closed form pays off: deltas are LoRA factors of total rank R below the layer's outputs,
    and the raw rows are there (no Grams-only statistics)."""
    if not isinstance(problem.deltas, LowRankDeltas) or problem.gram is not None or not has_rows(problem):
        return False
    rank = sum(int(u.shape[1]) for u in problem.deltas.ups)
    return 0 < rank < problem.W0.shape[0]


def _output_coordinates(W0: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """(L_W (in, k), L_U (R, k)) with ||A W0^T + B U^T|| = ||A L_W + B L_U|| row by row for any A, B: a factor
    L L^T = F^T F of F = [W0, U] (float64): its Cholesky factor (k = in + R) when F has full column rank, else
    the eigendecomposition's positive part (k its positive eigenvalues). Cholesky costs a small fraction of
    the eigendecomposition, and both factors give the same norms."""
    F = torch.cat([W0, U], 1).double()
    H = F.T @ F
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        evals, vecs = torch.linalg.eigh(H)
        keep = evals > 0
        L = vecs[:, keep] * evals[keep].sqrt()
    L = L.to(W0.dtype)
    return L[: W0.shape[1]], L[W0.shape[1] :]


def solve_lowrank(problem: LayerProblem, cfg: LoraclrConfig) -> tuple[Tensor, dict] | None:
    """Converged mode when every delta is a LoRA product: the same minimiser as the dense path, cheaper.

    With U = [s_1 up_1, ..., s_N up_N] (out, R) and V = [down_1; ...; down_N] (R, in), each delta is
    dW_i = U C_i with C_i = V restricted to concept i's rows, the anchor "sum" is U V, and the right-hand
    side of the closed form is B = sum_i a_i (dW_i - anchor) G_i = U M with M (R, in). So the minimiser of
    the convex part is U Z (:meth:`QuadSolver.solve_factored`): no dense (out, in) product per concept and
    R instead of out right-hand sides in the triangular solves. The hinge check needs the predictions and
    targets on the common rows; they share the base output R_i W0^T (one dense product instead of two), the
    rest is rank R. Returns None when some hinge is active (or the quadratic needs the eigen-solve): the
    caller then runs the dense path, whose majorise-minimise steps change B by dense terms.
    """
    dtype = resolve_dtype(cfg.dtype)
    sd = resolve_dtype(cfg.solve_dtype, "solve_dtype")
    dev = cfg.device
    xs = rows(problem, "loraclr", dtype, dev)
    lr: LowRankDeltas = problem.deltas
    n = len(xs)
    n_rows = [x.shape[0] for x in xs]
    W0 = problem.W0.to(device=dev, dtype=dtype)
    out_dim, in_dim = W0.shape
    w = objective_weights(cfg, n_rows, out_dim)
    a = (w.a_pos + w.a_mse).tolist()
    U = torch.cat([u.to(device=dev, dtype=dtype) * sc for u, sc in zip(lr.ups, lr.scales, strict=True)], 1)
    V = torch.cat([d.to(device=dev, dtype=dtype) for d in lr.downs], 0)  # (R, in)
    ends = torch.tensor([0] + [int(u.shape[1]) for u in lr.ups]).cumsum(0).tolist()
    blocks = [slice(ends[i], ends[i + 1]) for i in range(n)]
    # A0 = sum_i a_i G_i, accumulated in the compute dtype into one buffer and converted once (a float64 copy
    # per Gram cost as much as the Grams on the widest layers), and M's own-concept rows a_i V_i G_i.
    # V_i G_i = (V_i X_i^T) X_i: rank_i x rows x in multiply-adds in the compute dtype instead of
    # rank_i x in x in in the solve dtype (fewer where rows < in, and float32), as exact as the Gram itself.
    # Fewer rows than inputs (text-encoder fc2, the UNet's lowest resolution): solve in the span of the rows,
    # coordinates xq_i = X_i Q (Q (in, k) orthonormal, k = all rows), exactly as the dense path does (see
    # _Converged); E = D - anchor = U Z Q^T and ||E||_F = ||U Z||_F.
    Q = row_basis(xs)  # (in, k) or None
    xq = [x @ Q for x in xs] if Q is not None else xs
    G = gram_sum_rows(xq, a)  # (k, k), exactly symmetric
    M = torch.zeros(V.shape[0], G.shape[0], dtype=sd, device=dev)
    c = {"sum": 1.0, "mean": 1.0 / n}.get(cfg.anchor, 0.0)  # the anchor is c U V
    for i, x in enumerate(xs):
        if Q is None:
            M[blocks[i]] = (a[i] * ((V[blocks[i]] @ x.T) @ x)).to(sd)
        elif not c:
            M[blocks[i]] = (a[i] * ((V[blocks[i]] @ x.T) @ xq[i])).to(sd)
        else:  # M = sum_i a_i (C_i X_i^T) X_i Q, C_i = V_i-rows - c V: (1 - c) V_i on concept i's rows, -c V off
            CX = V @ x.T  # (R, n_i)
            own = CX[blocks[i]] * (1 - c)
            CX.mul_(-c)
            CX[blocks[i]] = own
            M += (a[i] * (CX @ xq[i])).to(sd)
    if c and Q is None:  # C_i = V_i-rows - c V: subtract c V sum_i a_i G_i (the product in the compute dtype)
        M -= c * (V @ G).to(sd)
    A0 = G.to(sd)
    del G
    ridge_abs = relative_ridge(A0, cfg.ridge, in_dim)
    if ridge_abs > 0:
        A0.diagonal().add_(ridge_abs)
    sol = QuadSolver(A0, cfg.rcond, cfg.solver).solve_factored(U.to(sd), M, cfg.lambda_reg)
    if sol is None:
        return None
    Z = sol.offset  # E = U Z (Q^T), the offset from the anchor
    Zf = Z.to(dtype) @ Q.T if Q is not None else Z.to(dtype)  # (R, in)
    Zp = Zf + c * V if c else Zf  # D = U Zp, the offset from W0
    Ud = U.to(sd)
    K = Ud.mT @ Ud

    def sq_u(Y: Tensor) -> float:  # ||Y U^T||^2 for Y (rows, R)
        Yd = Y.to(sd)
        return float(((Yd @ K) * Yd).sum())

    needs_hinge = cfg.lambda_con > 0 and n > 1
    neg = None
    common = len(set(n_rows)) == 1  # every row is a common row: the hinge products give the errors too
    RZ = RV = None
    if n > 1:  # exact negative distances (for the report also when lambda_con = 0, like the dense path)
        idx = common_row_index(n_rows, device=dev)
        R = torch.stack([x if common else x[i] for x, i in zip(xs, idx, strict=True)])
        # P_i = R_i (W0 + U Zp)^T and T_j = R_j (W0 + U C_j)^T are rows [R, R Y^T] [W0, U]^T; where the layer
        # has more outputs than inputs + R (GEGLU ff.net.0.proj: 8x), distances are taken in the coordinates
        # of a factor L of [W0, U]^T [W0, U] instead: ||y [W0, U]^T|| = ||y L|| per row, so every block and
        # row distance is unchanged and the products shrink by (in + R) / out
        Wl, Ul = (W0.T, U.T) if in_dim + U.shape[1] >= out_dim else _output_coordinates(W0, U)
        base = R @ Wl  # (N, m, out or k): the one dense product
        RZ = R @ Zp.T  # (N, m, R)
        RV = [R[i] @ V[blocks[i]].T for i in range(n)]  # (m, r_i)
        P = torch.baddbmm(base, RZ, Ul.expand(n, *Ul.shape))
        T = base
        for i in range(n):
            T[i].addmm_(RV[i], Ul[blocks[i]])
        neg, _ = _block_hardest(P, T, w.mu) if cfg.distance == "block" else _token_hardest(P, T)
        del P, T, base
        if needs_hinge and bool((neg < w.mu).any()):
            return None  # a hinge acts: the dense path runs the majorise-minimise steps
    # per-concept errors on all rows: X_i (D - dW_i)^T = X_i (Zp - C_i)^T U^T, from the hinge check's products
    # when they cover every row (Zp - C_i is Zp with V_i taken off concept i's own block)
    sq_list = []
    for i, x in enumerate(xs):
        if RZ is not None and common:
            Y = RZ[i].clone()
            Y[:, blocks[i]] -= RV[i]
        else:
            C = Zp.clone()
            C[blocks[i]] -= V[blocks[i]]
            Y = x @ C.T
        sq_list.append(sq_u(Y))
    sq = torch.tensor(sq_list, dtype=torch.float64)
    e_norm = math.sqrt(max(sq_u(Z.mT), 0.0))  # ||E||_F = ||U Z||_F (Q orthonormal)
    report = _converged_report(cfg, w, sq, neg, 0.0, e_norm, ridge_abs, out_dim, n_rows, steps=1, converged=True,
                               rel=0.0, note="closed form (no active hinge: global minimum); LoRA-factor path")
    if c:
        report["anchor"] = cfg.anchor
    return U @ Zp, report
