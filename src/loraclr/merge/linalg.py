"""Linear algebra shared by the merge methods: Grams, the rows' basis, the relative ridge, and the exact
quadratic solve. Pure tensor functions (STYLE.md); shapes follow :mod:`loraclr.merge.api`:
W0 and deltas (out, in), X[i] (n_i, in), gram[i] (in, in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def relative_ridge(A: Tensor, ridge: float, n_directions: int) -> float:
    """The absolute ridge ``ridge * tr(A) / n_directions``: ``ridge`` in units of the mean feature energy per
    input direction, so one setting means the same on every layer whatever its scale. The trace does not
    depend on the basis, so A may be a Gram in the rows' basis (K, K) while ``n_directions`` counts the
    directions the ridge is meant to be relative to."""
    return ridge * float(torch.diagonal(A).sum()) / n_directions


def _gram_block(n: int) -> int:
    return max(640, -(-n // 8))  # smaller blocks lose more to gemm overheads than they save


def gram_matrix(x: Tensor) -> Tensor:
    """x^T x (in, in) for rows x (n, in), computing only the column blocks on and above the diagonal and
    mirroring the rest: (k + 1) / 2k of the multiply-adds for k blocks (torch has no symmetric rank-k
    update). Bit-identical to ``x.T @ x``: each block is the same dot products."""
    return gram_sum_rows([x])


def gram_sum_rows(xs: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """sum_i w_i x_i^T x_i (in, in) for rows x_i (n_i, in) (weights None: all 1), accumulated in the rows' dtype
    into one buffer, block by block as :func:`gram_matrix`, and exactly symmetric (the lower blocks are
    mirrored). Why one buffer: converting each (in, in) Gram to float64 and adding it costs as much as forming
    it on SD 1.5's widest layers; the sum adds N roundings of the rows' dtype to Grams that already carry
    ~n_i of them."""
    n = xs[0].shape[1]
    w = [1.0] * len(xs) if weights is None else [float(v) for v in weights]
    block = _gram_block(n)
    if n < 2 * block:
        out = torch.mm(xs[0].T, xs[0])
        if w[0] != 1.0:
            out.mul_(w[0])
        for x, wi in zip(xs[1:], w[1:], strict=True):
            out.addmm_(x.T, x, alpha=wi)
        return out if len(xs) == 1 else symmetrize(out)
    out = xs[0].new_empty(n, n)
    for a in range(0, n, block):
        b = min(a + block, n)
        S = out[a:b, a:]  # (b - a, n - a): the row stripe from the diagonal on
        S.copy_(xs[0][:, a:b].T @ xs[0][:, a:])
        if w[0] != 1.0:
            S.mul_(w[0])
        for x, wi in zip(xs[1:], w[1:], strict=True):
            S.addmm_(x[:, a:b].T, x[:, a:], alpha=wi)
        out[b:, a:b] = S[:, b - a :].T
        if len(xs) > 1:  # the diagonal block was summed in place: make it exactly symmetric
            Dg = out[a:b, a:b]
            Dg.copy_(Dg.triu() + Dg.triu(1).mT)
    return out


def symmetrize(A: Tensor) -> Tensor:
    """(A + A^T) / 2: float32 accumulation can break symmetry in the last bit; eigh / Cholesky want it exact."""
    return (A + A.T) / 2


def gram_sum(grams: Tensor, weights: list[float] | None, dtype: torch.dtype) -> Tensor:
    """sum_i w_i G_i (in, in) in ``dtype`` (weights None: all 1), exactly symmetric. One Gram at a time is
    converted, so no ``dtype`` copy of all N Grams is made (float64 N x in x in at SD 1.5's widest layers)."""
    A = torch.zeros(grams.shape[-2:], dtype=dtype, device=grams.device)
    for i, g in enumerate(grams):
        A.add_(g.to(dtype), alpha=1.0 if weights is None else float(weights[i]))
    return symmetrize(A)


def row_basis(xs: list[Tensor] | None) -> Tensor | None:
    """Orthonormal basis Q (in, K) of the span of all concepts' rows, when they are fewer (K) than inputs.

    Predictions only see that span (X_i W^T = (X_i Q)(W Q)^T), and minimisers that use no unexcited
    direction (minimum-norm least squares, or any objective with a norm penalty on D) lie in it, so
    solving for C (out, K) and returning D = C Q^T is exact, with ||D||_F = ||C||_F; it turns an (in x in)
    eigen-solve into a (K x K) one (e.g. 768 -> 72 for cross-attention k/v). Any orthonormal basis will do,
    so the QR runs in the rows' dtype. None when there is nothing to gain (no rows, or K >= in).
    """
    if not xs:
        return None
    k, in_dim = sum(x.shape[0] for x in xs), xs[0].shape[1]
    if k >= in_dim:
        return None
    Q, _ = torch.linalg.qr(torch.cat(xs).T)  # (in, K)
    return Q


@dataclass
class QuadSolve:
    offset: Tensor  # (out, in)
    t: float  # ridge implied by the Frobenius-norm term, lambda_reg / (2 ||D||_F); 0 without it
    kept: int  # eigen-directions of A above the rcond cutoff
    dropped: int  # directions treated as unexcited (D = 0 there)
    quad: float = 0.0  # tr(D A D^T) - 2 <D, B> at the solution, from the eigen-solve (no extra product)


SOLVERS = ("auto", "eigh")


def check_solver(name: str) -> None:
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {name!r}")


class QuadSolver:
    """Minimiser of  tr(D A D^T) - 2 <D, B> + lambda_reg * ||D||_F  for one A (symmetric PSD (in, in)) and any
    number of right-hand sides B (out, in); see :meth:`solve` for the exact definition.

    ``method="eigh"`` is the reference: one eigendecomposition A = V diag(l) V^T, eigen-directions with
    l_k <= rcond * max(l) treated as unexcited (D = 0 there), and the ridge t of the Frobenius-norm term
    found by bisection in the eigenbasis. ``method="auto"`` first proves that no direction would be cut:
    a Cholesky factorisation of A - s I with s = rcond * (an upper bound of max(l)) + rounding margin
    succeeds only if every eigenvalue of A exceeds s, so the reference keeps every direction, and the
    minimiser is D = B (A + t I)^{-1}, computed with Cholesky factorisations (t by safeguarded Newton).
    When the proof fails (A rank-deficient or worse conditioned than 1 / rcond) it falls back to eigh.
    Why: on the widest layers an eigendecomposition costs many times a Cholesky factorisation plus the
    triangular solves (bench/RESULTS.md has the timings). The factor or
    eigendecomposition is kept, so repeated solves with the same A (majorise-minimise steps whose active
    hinge set did not change) cost only the right-hand side's work.
    """

    def __init__(self, A: Tensor, rcond: float, method: str = "auto"):
        check_solver(method)
        self.A, self.rcond, self.n = A, rcond, A.shape[0]
        self.method = "eigh"
        self._eig: tuple[Tensor, Tensor, Tensor] | None = None
        self._chol: tuple[float, Tensor] | None = None  # the latest (t, lower Cholesky factor of A + t I)
        self.shift0 = 0.0
        if method == "auto" and self.n:
            # rigorous upper bounds of the largest eigenvalue: the 2-norm is at most the Frobenius and the
            # max-row-sum norms. The rounding margin covers Cholesky's backward error (~n eps ||A||).
            top_ub = min(float(torch.linalg.matrix_norm(A)), float(A.abs().sum(1).max()))
            s = (rcond + 4 * self.n * torch.finfo(A.dtype).eps) * top_ub
            if top_ub > 0:
                L, info = torch.linalg.cholesky_ex(self._shifted(-s))
                if int(info) == 0:
                    self.method, self.shift0, self._chol = "cholesky", -s, (-s, L)
        if self.method == "eigh":
            self._eigen()

    def _shifted(self, t: float) -> Tensor:
        if t == 0:
            return self.A
        S = self.A.clone()
        S.diagonal().add_(t)
        return S

    def _factor(self, t: float) -> Tensor:
        """Cholesky factor of A + t I; only the latest is kept (each is as large as A)."""
        if self._chol is None or self._chol[0] != t:
            self._chol = None  # free the old factor before forming the next
            L, info = torch.linalg.cholesky_ex(self._shifted(t))
            if int(info) != 0:  # cannot happen for t >= shift0 (A + t I >= A - s I > 0) short of NaN
                raise ValueError(f"Cholesky factorisation of the quadratic failed at ridge {t!r}")
            self._chol = (t, L)
        return self._chol[1]

    def _eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._eig is None:
            evals, V = torch.linalg.eigh(self.A)  # ascending
            top = float(evals[-1]) if evals.numel() else 0.0
            keep = evals > self.rcond * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
            self._eig = (torch.where(keep, evals, torch.zeros_like(evals)), V, keep)
        return self._eig

    def solve(self, B: Tensor, lambda_reg: float) -> QuadSolve:
        """Exact minimiser of  tr(D A D^T) - 2 <D, B> + lambda_reg * ||D||_F.

        Stationarity: D (A + t I) = B with t = lambda_reg / (2 ||D||_F); D = 0 iff ||B||_F <= lambda_reg / 2
        over the kept directions (the subgradient condition at 0). With A = V diag(l) V^T and C = B V:
        ||D(t)||^2 = sum_k ||C[:, k]||^2 / (l_k + t)^2, and t ||D(t)|| rises monotonically from 0 to ||C||_F,
        so the root t* of t ||D(t)|| = lambda_reg / 2 is unique. lambda_reg = 0 gives the minimum-norm
        solution B A^+ (over the kept directions).
        """
        if self.method == "cholesky":
            return self._solve_cholesky(B, lambda_reg)
        return self._solve_eigh(B, lambda_reg)

    def _solve_eigh(self, B: Tensor, lambda_reg: float) -> QuadSolve:
        lam, V, keep = self._eigen()
        C = (B @ V) * keep  # (out, in)
        c2 = (C * C).sum(0)  # (in,)
        kept = int(keep.sum())
        dropped = self.n - kept
        if lambda_reg == 0:
            inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
            return QuadSolve((C * inv) @ V.T, 0.0, kept, dropped, -float((c2 * inv).sum()))
        half = lambda_reg / 2
        if math.sqrt(float(c2.sum())) <= half:
            return QuadSolve(torch.zeros_like(B), math.inf, kept, dropped)

        def h(t: float) -> float:  # t * ||D(t)||, increasing in t
            return t * math.sqrt(float((c2 / (lam + t) ** 2).sum()))

        top = float(lam[-1]) if lam.numel() else 0.0
        lo, hi = 1e-300, max(top, 1.0)
        while h(hi) < half:
            hi *= 16.0
        lo = hi
        while h(lo) >= half and lo > 1e-300:
            lo /= 16.0
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if h(mid) < half:
                lo = mid
            else:
                hi = mid
            if hi / lo < 1 + 1e-14:
                break
        t = math.sqrt(lo * hi)
        quad = float((c2 * (lam / (lam + t) ** 2 - 2 / (lam + t))).sum())
        return QuadSolve((C / (lam + t)) @ V.T, t, kept, dropped, quad)

    def _at(self, Bt: Tensor, t: float) -> Tensor:
        """(A + t I)^{-1} Bt  (in, k) for Bt (in, k), by two triangular solves."""
        L = self._factor(t)
        Y = torch.linalg.solve_triangular(L, Bt, upper=False)
        return torch.linalg.solve_triangular(L.mT, Y, upper=True)

    def solve_factored(self, U: Tensor, M: Tensor, lambda_reg: float) -> QuadSolve | None:
        """:meth:`solve` for B = U M given as factors, U (out, R), M (R, in), R < out: the minimiser is
        D = U Z with Z = M (A + t I)^{-1}, so the triangular solves take R right-hand sides instead of out
        (e.g. 192 instead of 1280 for twelve rank-16 LoRAs on an SD 1.5 ff layer), and every norm the Newton
        iteration needs comes from the (R, R) Gram U^T U. Returns Z (R, in) as ``offset``; ``quad`` as
        :meth:`solve`. None when this solver fell back to the eigen-solve (no Cholesky certificate): callers
        then form B = U M and use :meth:`solve`."""
        if self.method != "cholesky":
            return None
        K = U.mT @ U  # (R, R)
        Z, t, nx2 = self._newton(M.mT, K, lambda_reg)
        if Z is None:
            return QuadSolve(torch.zeros_like(M), math.inf, self.n, 0)
        dB = float((Z * (K @ M)).sum())  # <U Z, U M>
        return QuadSolve(Z, t, self.n, 0, -dB - t * nx2)

    def _solve_cholesky(self, B: Tensor, lambda_reg: float) -> QuadSolve:
        Z, t, nx2 = self._newton(B.mT, None, lambda_reg)
        if Z is None:
            return QuadSolve(torch.zeros_like(B), math.inf, self.n, 0)
        return QuadSolve(Z, t, self.n, 0, -float((Z * B).sum()) - t * nx2)

    def _newton(self, Bt: Tensor, K: Tensor | None, lambda_reg: float) -> tuple[Tensor | None, float, float]:
        """Z (k, in) = B' (A + t I)^{-1} at the Frobenius term's ridge t, for right-hand sides Bt = B'^T
        (in, k); D = Z (K None) or U Z (K = U^T U, norms ||U Y||^2 = <Y, K Y>). Returns (Z, t, ||D||^2);
        Z None when D = 0 is the minimiser."""

        def sq(Y: Tensor) -> float:  # ||D-like||^2 for Y (in, k) = D^T or U-factored D^T
            if K is None:
                return float((Y * Y).sum(dtype=torch.float64))
            return float(((Y @ K) * Y).sum(dtype=torch.float64))

        if lambda_reg == 0:
            X = self._at(Bt, 0.0)
            return X.mT.contiguous(), 0.0, sq(X)
        half = lambda_reg / 2
        if math.sqrt(max(sq(Bt), 0.0)) <= half:  # every direction is kept, so C = B V has the norm of B
            return None, math.inf, 0.0
        # Newton on phi(t) = 1 / ||D(t)|| - t / half (zero at t*, positive left of it), safeguarded by the
        # bracket [lo, hi]. phi' = tr(D (A + tI)^{-1} D^T) / ||D||^3 - 1 / half, the trace from one more
        # triangular solve. Start at the latest factor: the certificate's shift0 < 0 (phi > 0 there), or the
        # root for the previous right-hand side (usually close). D(t) is accepted once it is within 1e-10
        # (relative) of D(t*). With l_min > s = -shift0 (the certificate), D moves by at most
        # |dt| / (l_min + t) < |dt| / (t + s) relative, so either of two tests suffices:
        # - the next Newton step |dt| <= 1e-10 (t + s);
        # - before paying for phi': d ln(t ||D(t)||) / d ln t = 1 - t tr(D (A+tI)^{-1} D^T) / ||D||^2 lies in
        #   [s / (s + t), 1], so |ln t - ln t*| <= |ln(t ||D|| / half)| (s + t) / s, and D is within
        #   |ln(t ||D|| / half)| t / s of D(t*).
        s = -self.shift0
        lo, hi = self.shift0, math.inf
        t = self._chol[0] if self._chol is not None else self.shift0
        for _ in range(100):
            L = self._factor(t)
            X = self._at(Bt, t)
            nx2 = sq(X)
            nx = math.sqrt(nx2)
            if t > 0 and abs(math.log(t * nx / half)) * t <= 1e-10 * s:
                break
            phi = 1.0 / nx - t / half
            if phi > 0:
                lo = max(lo, t)
            else:
                hi = min(hi, t)
            W = torch.linalg.solve_triangular(L, X, upper=False)
            m1 = sq(W)
            dphi = m1 / (nx2 * nx) - 1.0 / half
            step = -phi / dphi if dphi < 0 else math.inf
            if t >= 0 and abs(step) <= 1e-10 * (t + s):
                break
            nxt = t + step
            if t >= 0 and abs(step) <= 1e-5 * (t + s) and lo < nxt < hi:
                # a last step this short needs no new factor: D(t + dt) = D(t) (I + dt (A + tI)^{-1})^{-1}, and
                # its first-order term -dt D(t) (A + tI)^{-1} (one more triangular solve) leaves a relative error
                # below rho^2 / (1 - rho), rho = |dt| / (t + s) <= 1e-5: within the 1e-10 of the tests above
                X = X - step * torch.linalg.solve_triangular(L.mT, W, upper=True)
                t, nx2 = nxt, sq(X)
                break
            if not (lo < nxt < hi):  # Newton left the bracket: bisect (or expand while no upper end)
                nxt = 0.5 * (lo + hi) if math.isfinite(hi) else max(2 * t, half / nx, 1e-300)
            t = nxt
        else:
            raise ValueError("Newton iteration for the Frobenius-norm ridge did not converge")
        return X.mT.contiguous(), t, nx2


def solve_quadratic_fro(A: Tensor, B: Tensor, lambda_reg: float, rcond: float, method: str = "auto") -> QuadSolve:
    """Exact minimiser of  tr(D A D^T) - 2 <D, B> + lambda_reg * ||D||_F  (A symmetric PSD (in, in), B (out, in)).

    Eigen-directions with l_k <= rcond * max(l) are treated as unexcited: D is 0 there. Grams accumulated in
    float32 carry noise of ~1e-7 relative to their largest eigenvalue, and dividing by a noise eigenvalue
    would inject arbitrary weights into directions no concept's inputs reach. See :class:`QuadSolver` for the
    methods (``"eigh"``: the eigen-solve reference; ``"auto"``: Cholesky when provably nothing is cut).
    """
    return QuadSolver(A, rcond, method).solve(B, lambda_reg)
