"""Helpers shared by the merge methods: input checks, feature statistics, and the exact quadratic solve.

Everything here is a pure tensor function (STYLE.md). Shapes follow :mod:`loraclr.merge.api`:
W0 and deltas (out, in), X[i] (n_i, in), gram[i] (in, in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from loraclr.merge.api import LayerProblem, LowRankDeltas

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
    an fp64 accumulator made it ~28x slower on fp32 deltas (a converting pass), and an overflow only sends
    it to the exact check."""
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


def gram_matrix(x: Tensor) -> Tensor:
    """x^T x (in, in) for rows x (n, in), computing only the column blocks on and above the diagonal and
    mirroring the rest: (k + 1) / 2k of the multiply-adds for k blocks. torch has no symmetric rank-k
    update; at SD 1.5's widest layers (in 5120, 2048 rows, one thread) this takes 3.1 s instead of 5.1 s,
    bit-identical to ``x.T @ x`` there (each block is the same dot products)."""
    n = x.shape[1]
    block = max(640, -(-n // 8))  # smaller blocks lose more to gemm overheads than they save
    if n < 2 * block:
        return x.T @ x
    out = x.new_empty(n, n)
    for a in range(0, n, block):
        b = min(a + block, n)
        S = x[:, a:b].T @ x[:, a:]  # (b - a, n - a): the row stripe from the diagonal on
        out[a:b, a:] = S
        out[b:, a:b] = S[:, b - a :].T
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
    Why: a float64 eigendecomposition of a 5120 x 5120 Gram takes ~65-95 s on one core, a Cholesky ~3 s
    and a triangular solve with 1280 right-hand sides ~1.7 s (bench/results/merge_speed.md). The factor or
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
