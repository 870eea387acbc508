"""The fast quadratic solve (Cholesky, ``solver="auto"``) against the eigendecomposition reference
(``solver="eigh"``), on its own and inside lstsq / converged LoRACLR: well-conditioned, rank-deficient and
ill-conditioned Grams (where the rcond cut-off must act, so auto has to fall back), lambda_reg > 0, ridge > 0
and active hinges."""

from __future__ import annotations

import pytest
import torch

from loraclr.merge.api import LayerProblem
from loraclr.merge.linalg import QuadSolver
from loraclr.merge.methods import merge_offsets

F64 = torch.float64


def _gram(n, rows, rank=None, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, rank or n, generator=g, dtype=F64)
    if rank is not None:
        X = X @ torch.randn(rank, n, generator=g, dtype=F64)  # rows span only `rank` input directions
    X = X * torch.exp(spread * torch.randn(n, generator=g, dtype=F64))  # uneven channel scales
    return X.T @ X


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _stationarity(A, B, sol, lam):
    """|| D (A + t I) - B || relative to ||B||: zero at the minimiser when nothing is cut."""
    D = sol.offset
    return float((D @ A + lam / (2 * D.norm()) * D - B).norm() / B.norm()) if lam else float(
        (D @ A - B).norm() / B.norm()
    )


@pytest.mark.parametrize("lam", [0.0, 1e-3, 1.0, 30.0])
def test_cholesky_equals_eigh_on_a_full_rank_gram(lam):
    A = _gram(40, 120)
    B = torch.randn(7, 40, generator=torch.Generator().manual_seed(1), dtype=F64)
    fast, ref = QuadSolver(A, 1e-6, "auto"), QuadSolver(A, 1e-6, "eigh")
    assert fast.method == "cholesky" and ref.method == "eigh"
    f, r = fast.solve(B, lam), ref.solve(B, lam)
    assert _rel(f.offset, r.offset) < 1e-10
    assert f.t == pytest.approx(r.t, rel=1e-9)
    assert f.quad == pytest.approx(r.quad, rel=1e-9)
    assert (f.kept, f.dropped) == (r.kept, r.dropped) == (40, 0)
    assert _stationarity(A, B, f, lam) < 1e-10


def test_norm_term_large_enough_gives_zero():
    A = _gram(20, 60)
    B = torch.randn(3, 20, generator=torch.Generator().manual_seed(2), dtype=F64)
    lam = 2.0 * float(B.norm()) * 1.001  # ||B|| <= lambda / 2: D = 0 is optimal
    f = QuadSolver(A, 1e-6, "auto").solve(B, lam)
    assert QuadSolver(A, 1e-6, "auto").method == "cholesky"
    assert float(f.offset.abs().max()) == 0.0


def test_repeated_right_hand_sides_reuse_the_factor():
    """Majorise-minimise solves many B against one A: each must equal a fresh reference solve."""
    A = _gram(30, 90, seed=3)
    fast = QuadSolver(A, 1e-6, "auto")
    g = torch.Generator().manual_seed(4)
    B = torch.randn(5, 30, generator=g, dtype=F64)
    for k in range(4):
        B = B + 0.3 * torch.randn(5, 30, generator=g, dtype=F64)
        lam = [1e-3, 0.5, 0.0, 2.0][k]
        assert _rel(fast.solve(B, lam).offset, QuadSolver(A, 1e-6, "eigh").solve(B, lam).offset) < 1e-10


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_rank_deficient_gram_falls_back_to_the_cut(lam):
    A = _gram(40, 200, rank=25, seed=5)  # 15 directions no row excites: must be cut, not inverted
    B = torch.randn(6, 40, generator=torch.Generator().manual_seed(6), dtype=F64) @ A  # B in A's range
    fast = QuadSolver(A, 1e-6, "auto")
    assert fast.method == "eigh"
    f, r = fast.solve(B, lam), QuadSolver(A, 1e-6, "eigh").solve(B, lam)
    assert (f.kept, f.dropped) == (r.kept, r.dropped) == (25, 15)
    assert torch.equal(f.offset, r.offset)


def test_ill_conditioned_gram_below_rcond_falls_back():
    """Full rank, but eigenvalues spread over 1e9: the 1e-6 cut-off removes some; auto must not invert
    them. With rcond 1e-12 nothing is cut and auto may use Cholesky again, with the same result."""
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=F64))
    A = (Q * torch.logspace(0, 9, 30, dtype=F64)) @ Q.T
    A = (A + A.T) / 2
    B = torch.randn(4, 30, generator=g, dtype=F64)
    fast = QuadSolver(A, 1e-6, "auto")
    assert fast.method == "eigh"
    r = QuadSolver(A, 1e-6, "eigh").solve(B, 1e-3)
    assert r.dropped > 0 and torch.equal(fast.solve(B, 1e-3).offset, r.offset)
    fast = QuadSolver(A, 1e-12, "auto")
    assert fast.method == "cholesky"
    assert _rel(fast.solve(B, 1e-3).offset, QuadSolver(A, 1e-12, "eigh").solve(B, 1e-3).offset) < 1e-6


def _problem(out=6, inn=12, rows=(30, 30, 30), rank=None, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, inn, generator=g)
    deltas = [0.3 * torch.randn(out, 3, generator=g) @ torch.randn(3, inn, generator=g) for _ in rows]
    xs = []
    for n in rows:
        x = torch.randn(n, rank or inn, generator=g)
        if rank is not None:
            x = x @ torch.randn(rank, inn, generator=g)
        xs.append(scale * x)
    return LayerProblem("unet.ff.net.2", W0, deltas, X=xs, concept_names=[f"c{i}" for i in range(len(rows))])


def _both(problem, method, **cfg):
    res = {
        s: merge_offsets([problem], method, {**cfg, "solver": s}, progress=False)[problem.key]
        for s in ("eigh", "auto")
    }
    return res["auto"], res["eigh"]


@pytest.mark.parametrize("ridge", [0.0, 0.1])
@pytest.mark.parametrize("rank", [None, 8])
def test_lstsq_auto_equals_eigh(ridge, rank):
    p = _problem(rank=rank)
    f, r = _both(p, "lstsq", ridge=ridge)
    assert _rel(f.offset.double(), r.offset.double()) < 1e-5  # offsets are returned in float32
    assert f.report["kept_dims"] == r.report["kept_dims"]
    assert f.report["loss"] == pytest.approx(r.report["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        {"lambda_reg": 0.0},
        {"lambda_reg": 0.001},
        {"lambda_reg": 0.5},
        {"lambda_reg": 0.001, "ridge": 0.05},
        {"lambda_reg": 0.01, "distance": "token"},
    ],
)
@pytest.mark.parametrize("rank", [None, 8])
def test_converged_auto_equals_eigh_without_hinges(cfg, rank):
    p = _problem(rank=rank)
    f, r = _both(p, "loraclr", mode="converged", **cfg)
    assert r.report["hinge_active"] == 0.0 and r.report["steps"] == 1
    assert _rel(f.offset.double(), r.offset.double()) < 1e-5
    assert f.report["loss"] == pytest.approx(r.report["loss"], rel=1e-6)


@pytest.mark.parametrize("cfg", [{}, {"ridge": 0.05}, {"distance": "token"}, {"lambda_reg": 0.05}])
def test_converged_auto_equals_eigh_with_active_hinges(cfg):
    """Small features put whole-block distances near the margin: the majorise-minimise loop runs, with
    re-used factorisations while the active set holds; both solvers take the same path to the same point."""
    p = _problem(out=3, inn=5, rows=(4, 4, 4), scale=0.05, seed=1)
    f, r = _both(p, "loraclr", mode="converged", **cfg)
    assert r.report["hinge_active"] > 0 and r.report["steps"] > 1
    assert f.report["steps"] == r.report["steps"]
    assert _rel(f.offset.double(), r.offset.double()) < 1e-5
    assert f.report["loss"] == pytest.approx(r.report["loss"], rel=1e-7)


def test_solver_is_checked():
    from loraclr.merge.methods import make_config

    with pytest.raises(ValueError, match="solver"):
        make_config("lstsq", solver="lu")
    with pytest.raises(ValueError, match="solver"):
        make_config("loraclr", mode="converged", solver="cholesky")


def test_blocked_gram_equals_the_plain_product():
    from loraclr.merge.linalg import gram_matrix

    x = torch.randn(50, 1300, generator=torch.Generator().manual_seed(8))  # wide enough for 2+ blocks
    G = gram_matrix(x)
    assert torch.allclose(G, x.T @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(G, G.T)
