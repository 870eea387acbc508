"""LoRACLR merge: paper mode against an independent step-by-step reference of the official update rule,
converged mode against independent solutions (regularised least squares, hand-built hinge geometry,
stationarity of an independently written objective)."""

from __future__ import annotations

import math

import pytest
import torch

from loraclr.merge.api import LayerProblem
from loraclr.merge.methods import make_config, merge_offsets

F64 = torch.float64


def _merge(problem, **cfg):
    return merge_offsets([problem], "loraclr", cfg, progress=False)[problem.key]


def _synthetic(n_rows=(4, 4, 4), out=3, inn=5, scale=0.05, seed=0, names=None):
    """Small features so that whole-block distances sit near the margin of 0.5 (hinges fire)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, inn, generator=g)
    deltas = [0.5 * torch.randn(out, inn, generator=g) for _ in n_rows]
    xs = [scale * torch.randn(n, inn, generator=g) for n in n_rows]
    names = names or [f"c{i}" for i in range(len(n_rows))]
    return LayerProblem("unet.attn1.to_q", W0, deltas, X=xs, concept_names=names)


def _common_rows(n_rows):
    m = min(n_rows)
    return [[round(k * (n - 1) / (m - 1)) if m > 1 else 0 for k in range(m)] for n in n_rows]


def reference_objective(D, p, margin=0.5, lc=1.0, lm=0.1, lr=0.001, official_expansion=False):
    """Independent LoRACLR objective (block distances), written with explicit loops in float64."""
    W0 = p.W0.to(F64)
    xs = [x.to(F64) for x in p.X]
    P = [x @ (W0 + D).T for x in xs]
    Y = [x @ (W0 + d.to(F64)).T for x, d in zip(xs, p.deltas, strict=True)]
    n = len(xs)
    rows = _common_rows([x.shape[0] for x in xs])

    def dist(a, b):
        a, b = a.flatten(), b.flatten()
        if official_expansion:
            return torch.sqrt(torch.clamp(a @ a + b @ b - 2 * (a @ b), min=1e-12))
        return torch.sqrt(((a - b) ** 2).sum())

    con = 0.0
    for i in range(n):
        pos = dist(P[i], Y[i])
        negs = [dist(P[i][rows[i]], Y[j][rows[j]]) for j in range(n) if j != i]
        hinge = torch.clamp(margin - min(negs), min=0) ** 2 if negs else 0.0
        con = con + pos**2 + hinge
    con = con / n
    sse = sum(((P[i] - Y[i]) ** 2).sum() for i in range(n))
    mse = sse / (p.W0.shape[0] * sum(x.shape[0] for x in xs))
    sq = (D**2).sum()
    reg = torch.sqrt(sq) if float(sq.detach()) > 0 else sq  # gradient 0 at D = 0, as torch.norm's
    return lc * con + lm * mse + lr * reg


def reference_paper(p, steps=50, lr=1e-4, wd=1e-4, betas=(0.9, 0.999), eps=1e-8):
    """The official update rule, step by step: evaluate the loss of D, keep D if best so far, then one
    AdamW step with the moments written out (decoupled weight decay, bias-corrected moments)."""
    D = torch.zeros(p.W0.shape, dtype=F64)
    m = torch.zeros_like(D)
    v = torch.zeros_like(D)
    best, best_D, best_t = math.inf, D.clone(), -1
    for t in range(1, steps + 1):
        Dg = D.clone().requires_grad_(True)
        loss = reference_objective(Dg, p, official_expansion=True)
        (g,) = torch.autograd.grad(loss, Dg)
        value = float(loss.detach())
        if value < best:
            best, best_D, best_t = value, D.clone(), t - 1
        D = D * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        D = D - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return best_D, best, best_t


@pytest.mark.parametrize("seed,n_rows", [(0, (4, 4, 4)), (1, (3, 5, 4))])
def test_paper_mode_matches_step_by_step_reference(seed, n_rows):
    p = _synthetic(n_rows, seed=seed)
    ref_D, ref_loss, ref_step = reference_paper(p)
    r = _merge(p, mode="paper", dtype="float64")
    assert torch.allclose(r.offset.double(), ref_D, atol=1e-7, rtol=0)
    assert r.report["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert r.report["best_step"] == ref_step
    assert r.report["best_is_last"] == (ref_step == 49)
    assert 0 < r.report["hinge_active"] <= 1  # the hinge is exercised on this data
    # D moved by at most ~lr * steps per element (the official recipe barely leaves 0)
    assert r.offset.abs().max() <= 50 * 1e-4 * 1.01
    # float32 (the default) follows the same path closely
    r32 = _merge(p, mode="paper")
    assert torch.allclose(r32.offset.double(), ref_D, atol=2e-6)


def test_converged_beats_paper_and_reports_convergence():
    p = _synthetic((6, 6, 6, 6), seed=4)
    paper = _merge(p, mode="paper")
    conv = _merge(p, mode="converged")
    assert conv.report["converged"] is True
    assert paper.report["converged"] is False
    lp = float(reference_objective(paper.offset.double(), p))
    lc = float(reference_objective(conv.offset.double(), p))
    assert lc < lp
    assert conv.report["loss"] == pytest.approx(lc, rel=1e-5)


@pytest.mark.parametrize(
    "seed,n_rows,scale,inn",
    [
        (0, (4, 4, 4), 0.05, 5),
        (5, (3, 5, 4), 0.05, 5),
        (1, (3, 5, 4), 0.05, 5),
        (4, (6,) * 4, 0.02, 5),
        (1, (3, 4, 3), 0.03, 20),  # fewer rows (10) than inputs (20): solved in the rows' span
    ],
)
def test_converged_is_a_stationary_point(seed, n_rows, scale, inn):
    """Gradient of the independently written objective vanishes at the converged D (hinges active)."""
    p = _synthetic(n_rows, seed=seed, scale=scale, inn=inn)
    r = _merge(p, mode="converged")
    assert r.report["hinge_active"] > 0
    D = r.offset.double().requires_grad_(True)
    (g,) = torch.autograd.grad(reference_objective(D, p), D)
    Z = torch.zeros_like(D, requires_grad=True)
    (g0,) = torch.autograd.grad(reference_objective(Z, p), Z)
    assert g.norm() < 1e-3 * g0.norm()
    # and no lower point nearby: L-BFGS started at the solution does not improve it meaningfully
    x = r.offset.double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=40, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss = reference_objective(x, p)
        loss.backward()
        return loss

    opt.step(closure)
    assert float(reference_objective(x.detach(), p)) >= r.report["loss"] * (1 - 1e-5)


def _reg_lstsq_reference(p, lm, lr):
    """Independent solution of min_D lm * MSE + lr * ||D||_F from the stacked rows, in float64.

    Optimality: D (X^T X + t I) = sum_i dW_i X_i^T X_i with t = c * lr / (2 ||D||) (c = out * n_total / lm);
    the scalar ||D|| is found by bisection on the fixed-point equation with dense linear solves."""
    xs = [x.to(F64) for x in p.X]
    Xs = torch.cat(xs)
    T = torch.cat([x @ d.to(F64).T for x, d in zip(xs, p.deltas, strict=True)])  # targets of D
    out = p.W0.shape[0]
    c = out * Xs.shape[0] / lm
    G, B = Xs.T @ Xs, T.T @ Xs
    eye = torch.eye(G.shape[0], dtype=F64)

    def D_of(t):
        return torch.linalg.solve(G + t * eye, B.T).T

    lo, hi = 1e-12, 1e6  # t * ||D(t)|| increases in t; find it equal to c * lr / 2
    for _ in range(300):
        mid = math.sqrt(lo * hi)
        if mid * float(D_of(mid).norm()) < c * lr / 2:
            lo = mid
        else:
            hi = mid
    return D_of(math.sqrt(lo * hi))


def test_lambda_con_zero_equals_regularised_least_squares():
    p = _synthetic((7, 9, 8), inn=5, scale=1.0, seed=7)
    lm, lr = 0.1, 0.05  # a visible regulariser
    r = _merge(p, mode="converged", lambda_con=0.0, lambda_mse=lm, lambda_reg=lr)
    golden = _reg_lstsq_reference(p, lm, lr)
    assert torch.allclose(r.offset.double(), golden, atol=1e-5)
    assert r.report["converged"] is True and r.report["steps"] == 1
    # ... and with lambda_reg = 0 it is exactly lstsq
    r0 = _merge(p, mode="converged", lambda_con=0.0, lambda_reg=0.0)
    ls = merge_offsets([p], "lstsq", progress=False)[p.key]
    assert torch.allclose(r0.offset, ls.offset, atol=1e-5)


def _hand_built():
    """Three one-row concepts on orthogonal inputs (so each column of D serves one concept), W0 = 0.
    Targets: Y_1 = (0, 0), Y_2 = (0.2, 0), Y_3 = (10, 10). Only anchors 1 and 2 have a negative within
    the margin 0.5. With lambda_mse = lambda_reg = 0, anchor 1 minimises d^2 + (0.5 - (0.2 + d))^2 along
    the line away from Y_2: d = 0.15, so pos = 0.15, neg = 0.35, and L = (0.045 + 0.045 + 0) / 3."""
    W0 = torch.zeros(2, 3)
    cols = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 10.0]])
    deltas = []
    for i in range(3):
        d = torch.zeros(2, 3)
        d[:, i] = cols[i]
        deltas.append(d)
    xs = [torch.eye(3)[i : i + 1] for i in range(3)]
    return LayerProblem("unet.hand", W0, deltas, X=xs, concept_names=["a", "b", "c"])


def test_hinge_active_fraction_and_distances_on_hand_built_case():
    p = _hand_built()
    r = _merge(p, mode="converged", lambda_mse=0.0, lambda_reg=0.0)
    assert r.report["hinge_active"] == pytest.approx(2 / 3)
    assert r.report["pos_dist"] == pytest.approx([0.15, 0.15, 0.0], abs=1e-5)
    assert r.report["neg_dist"][:2] == pytest.approx([0.35, 0.35], abs=1e-5)
    assert r.report["loss"] == pytest.approx(0.03, abs=1e-8)
    assert r.report["converged"] is True
    # the paper recipe barely moves D from 0, where every prediction is W0 x = 0 = Y_1: all 3 active
    rp = _merge(p, mode="paper", lambda_mse=0.0, lambda_reg=0.0)
    assert rp.report["hinge_active"] == 1.0
    # token distances on one-row blocks are the same thing; normalize divides by sqrt(out) = sqrt(2)
    rt = _merge(p, mode="converged", lambda_mse=0.0, lambda_reg=0.0, distance="token")
    assert rt.report["hinge_active"] == pytest.approx(2 / 3)
    assert rt.report["pos_dist"] == pytest.approx([0.15, 0.15, 0.0], abs=1e-5)
    rn = _merge(p, mode="converged", lambda_mse=0.0, lambda_reg=0.0, normalize=True)
    # normalised margin 0.5 = raw 0.5 * sqrt(2): raw d = (0.5 sqrt 2 - 0.2) / 2 on each side
    d = (0.5 * math.sqrt(2) - 0.2) / 2
    assert rn.report["pos_dist"][:2] == pytest.approx([d / math.sqrt(2)] * 2, abs=1e-5)
    assert rn.report["hinge_active"] == pytest.approx(2 / 3)


def test_token_distance_hinge_fraction():
    """Two concepts with two rows each; only row 0 of the targets is within the margin."""
    W0 = torch.zeros(1, 4)
    d1, d2 = torch.zeros(1, 4), torch.zeros(1, 4)
    d1[0, 0], d1[0, 1] = 0.0, 0.0
    d2[0, 2], d2[0, 3] = 0.1, 5.0
    # concept 1 rows are e0, e1; concept 2 rows are e2, e3: targets row0: 0 vs 0.1 (close), row1: 0 vs 5
    xs = [torch.eye(4)[0:2], torch.eye(4)[2:4]]
    p = LayerProblem("unet.tok", W0, [d1, d2], X=xs)
    r = _merge(p, mode="converged", distance="token", lambda_mse=0.0, lambda_reg=0.0)
    assert r.report["hinge_active"] == pytest.approx(0.5)  # 2 of the 4 (concept, row) terms


def test_concept_order_invariance_both_modes():
    p = _synthetic((5, 4, 6), seed=9)
    perm = [2, 0, 1]
    q = LayerProblem(
        p.key,
        p.W0,
        [p.deltas[i] for i in perm],
        X=[p.X[i] for i in perm],
        concept_names=[p.concept_names[i] for i in perm],
    )
    for mode, distance in (("paper", "block"), ("converged", "block"), ("converged", "token")):
        a = _merge(p, mode=mode, distance=distance).offset
        b = _merge(q, mode=mode, distance=distance).offset
        assert torch.allclose(a, b, atol=1e-6), (mode, distance)


def test_gram_only_when_hinge_provably_inactive():
    p = _synthetic((6, 6, 6), scale=3.0, seed=11)  # large features: negatives far beyond the margin
    with_rows = _merge(p, mode="converged")
    assert with_rows.report["hinge_active"] == 0.0
    grams = LayerProblem(p.key, p.W0, p.deltas, gram=[x.T @ x for x in p.X], n_rows=[6, 6, 6])
    r = _merge(grams, mode="converged")
    assert torch.allclose(r.offset, with_rows.offset, atol=1e-5)
    assert r.report["neg_dist_is_lower_bound"] is True
    assert all(
        lb <= d + 1e-4 for lb, d in zip(r.report["neg_dist"], with_rows.report["neg_dist"], strict=True)
    )
    small = _synthetic((6, 6, 6), scale=0.1, seed=11)
    grams = LayerProblem(p.key, small.W0, small.deltas, gram=[x.T @ x for x in small.X], n_rows=[6, 6, 6])
    with pytest.raises(ValueError, match="unet.attn1.to_q.*raw rows"):
        _merge(grams, mode="converged")
    with pytest.raises(ValueError, match="unet.attn1.to_q"):
        _merge(grams, mode="paper")


def test_one_concept_and_unequal_rows():
    p = _synthetic((5,), seed=12)
    r = _merge(p, mode="converged", lambda_reg=0.0)
    assert torch.allclose(r.offset, p.deltas[0], atol=1e-5)  # no negatives: pure least squares
    assert r.report["neg_dist"] == [None] and r.report["hinge_active"] == 0.0
    q = _synthetic((2, 9, 5, 3), seed=13)
    for mode in ("paper", "converged"):
        rep = _merge(q, mode=mode).report
        assert len(rep["pos_dist"]) == 4 and all(math.isfinite(v) for v in rep["neg_dist"])


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        make_config("loraclr", mode="fast")
    with pytest.raises(ValueError, match="distance"):
        make_config("loraclr", distance="row")
    with pytest.raises(ValueError, match="lambda_reg"):
        make_config("loraclr", lambda_reg=-1.0)
    with pytest.raises(ValueError, match="steps"):
        make_config("loraclr", steps=0)
    with pytest.raises(ValueError, match="marg"):
        make_config("loraclr", marg=0.3)


def test_grams_with_rows_for_negatives():
    """Grams (full statistics) plus raw rows for the negatives: with all rows kept this is the same
    problem as rows alone; with a subsample, negatives use the kept rows and the solve still runs."""
    p = _synthetic((6, 6, 6), seed=0)
    both = LayerProblem(p.key, p.W0, p.deltas, X=p.X, gram=[x.T @ x for x in p.X], n_rows=[6, 6, 6])
    a, b = _merge(p, mode="converged"), _merge(both, mode="converged")
    assert torch.allclose(a.offset, b.offset, atol=1e-5)
    assert a.report["hinge_active"] == b.report["hinge_active"] > 0
    sub = LayerProblem(p.key, p.W0, p.deltas, X=[x[:3] for x in p.X], gram=both.gram, n_rows=[6, 6, 6])
    r = _merge(sub, mode="converged")
    assert r.report["converged"] is True and len(r.report["neg_dist"]) == 3


def _near_duplicate_inputs(eps=1e-2, seed=3):
    """Two concepts whose inputs are almost the same low-rank rows (like the padded positions after
    end-of-text, shared by every prompt) but whose LoRAs want different outputs there: only the tiny
    differences between the rows tell the concepts apart, so fitting both needs huge weights."""
    g = torch.Generator().manual_seed(seed)
    inn, out, n = 6, 4, 12
    base = torch.randn(n, 2, generator=g) @ torch.randn(2, inn, generator=g)  # shared rows span 2 of 6 dims
    xs = [base + eps * torch.randn(n, inn, generator=g) for _ in range(2)]
    W0 = torch.randn(out, inn, generator=g)
    deltas = [0.1 * torch.randn(out, inn, generator=g) for _ in range(2)]
    return LayerProblem("text_encoder.text_model.encoder.layers.0.mlp.fc1", W0, deltas, X=xs,
                        concept_names=["a", "b"])


def test_ridge_bounds_the_offset_on_near_duplicate_inputs():
    p = _near_duplicate_inputs()
    largest = max(float(d.norm()) for d in p.deltas)
    plain = _merge(p, mode="converged")  # the official objective
    ridged = _merge(p, mode="converged", ridge=1e-2)
    # the unregularised optimum separates the near-identical rows with an offset >10x any LoRA delta ...
    assert float(plain.offset.norm()) > 10 * largest
    # ... the relative ridge keeps it at the scale of the deltas, and costs little fit on the rows
    assert float(ridged.offset.norm()) < 1.5 * largest
    assert ridged.report["ridge_term"] > 0 and "ridge_term" not in plain.report
    fit = [float((x @ (ridged.offset - d).T).norm() / (x @ d.T).norm()) for x, d in zip(p.X, p.deltas, strict=True)]
    assert max(fit) < 1.0


def test_ridge_closed_form_matches_independent_solution():
    """With lambda_con = 0 and lambda_reg = 0, ridge r solves (sum_i a X_i^T X_i + r e I) exactly."""
    p = _synthetic((7, 9, 8), inn=5, scale=1.0, seed=11)
    lm, r = 0.1, 0.05
    res = _merge(p, mode="converged", lambda_con=0.0, lambda_mse=lm, lambda_reg=0.0, ridge=r)
    xs = [x.to(F64) for x in p.X]
    Xs = torch.cat(xs)
    a = lm / (p.W0.shape[0] * Xs.shape[0])  # MSE weight per squared residual
    G = a * Xs.T @ Xs
    B = a * torch.cat([x @ d.to(F64).T for x, d in zip(xs, p.deltas, strict=True)]).T @ Xs
    e = float(torch.trace(G)) / G.shape[0]
    golden = torch.linalg.solve(G + r * e * torch.eye(G.shape[0], dtype=F64), B.T).T
    assert torch.allclose(res.offset.double(), golden, atol=1e-6)


def test_ridge_is_refused_in_paper_mode():
    with pytest.raises(ValueError, match="ridge"):
        make_config("loraclr", mode="paper", ridge=0.1)


def _half_excited(seed=5):
    """(problem, deltas): three concepts whose inputs span only the first 3 of 6 input directions."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(4, 6, generator=g)
    deltas = [torch.randn(4, 6, generator=g) for _ in range(3)]
    xs = [torch.cat([torch.randn(8, 3, generator=g), torch.zeros(8, 3)], 1) for _ in range(3)]
    return LayerProblem("unet.attn1.to_q", W0, deltas, X=xs, concept_names=["a", "b", "c"]), deltas


def test_anchor_sum_keeps_the_naive_sum_where_no_concept_looks():
    """Inputs span only 3 of 6 input directions: anchor 'base' leaves the base weight on the other 3 (D = 0
    there), anchor 'sum' leaves the naive sum of deltas there; both fit the rows the same."""
    p, deltas = _half_excited()
    base = _merge(p, mode="converged", lambda_con=0.0, lambda_reg=0.0)
    anch = _merge(p, mode="converged", lambda_con=0.0, lambda_reg=0.0, anchor="sum")
    total = sum(deltas)
    assert torch.allclose(base.offset[:, 3:], torch.zeros(4, 3), atol=1e-5)
    assert torch.allclose(anch.offset[:, 3:], total[:, 3:], atol=1e-5)
    assert torch.allclose(anch.offset[:, :3], base.offset[:, :3], atol=1e-4)  # the excited block: same fit
    assert anch.report["anchor"] == "sum" and "anchor" not in base.report


def test_anchor_sum_with_a_large_ridge_is_naive_stacking():
    p = _synthetic((6, 6, 6), inn=5, scale=1.0, seed=3)
    res = _merge(p, mode="converged", ridge=1e4, anchor="sum")
    total = sum(p.deltas)
    assert float((res.offset - total).norm() / total.norm()) < 1e-3
    far = _merge(p, mode="converged", ridge=1e4)  # anchored at the base: pulled to no change at all
    assert float(far.offset.norm() / total.norm()) < 1e-3


def test_anchor_mean_keeps_the_average_where_no_concept_looks_and_tends_to_it_with_a_large_ridge():
    """anchor 'mean' is 'sum' with FedAvg's mean of the deltas in place of their sum: the unexcited input
    directions keep the mean, the excited ones get the same fit, and a large ridge gives the average merge."""
    p, deltas = _half_excited()
    base = _merge(p, mode="converged", lambda_con=0.0, lambda_reg=0.0)
    mean = _merge(p, mode="converged", lambda_con=0.0, lambda_reg=0.0, anchor="mean")
    avg = sum(deltas) / 3
    assert torch.allclose(mean.offset[:, 3:], avg[:, 3:], atol=1e-5)
    assert not torch.allclose(mean.offset[:, 3:], sum(deltas)[:, 3:], atol=1e-2)
    assert torch.allclose(mean.offset[:, :3], base.offset[:, :3], atol=1e-4)
    assert mean.report["anchor"] == "mean"
    q = _synthetic((6, 6, 6), inn=5, scale=1.0, seed=3)
    far = _merge(q, mode="converged", ridge=1e4, anchor="mean")
    avg = sum(q.deltas) / len(q.deltas)
    assert float((far.offset - avg).norm() / avg.norm()) < 1e-3


def test_anchor_is_checked():
    with pytest.raises(ValueError, match="anchor"):
        make_config("loraclr", anchor="average")


def _factored(n_rows=(40, 40, 40), out=24, inn=16, rank=2, scale=1.0, seed=5):
    """The same layer twice: deltas as LoRA factors (the factored closed form applies: N * rank < out) and
    as dense deltas (the dense path)."""
    from loraclr.merge.api import LowRankDeltas

    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, inn, generator=g)
    ups = [torch.randn(out, rank, generator=g) for _ in n_rows]
    downs = [torch.randn(rank, inn, generator=g) for _ in n_rows]
    scales = [0.3 + 0.1 * i for i in range(len(n_rows))]
    xs = [scale * torch.randn(n, inn, generator=g) for n in n_rows]
    low = LayerProblem("unet.ff.net.2", W0, LowRankDeltas(ups, downs, scales), X=xs)
    dense = LayerProblem("unet.ff.net.2", W0, [s * (u @ d) for u, d, s in zip(ups, downs, scales, strict=True)], X=xs)
    return low, dense


@pytest.mark.parametrize(
    "cfg",
    [
        dict(mode="converged", anchor="sum", ridge=0.1),
        dict(mode="converged", anchor="sum", ridge=0.1, lambda_reg=0.0),
        dict(mode="converged", anchor="base", ridge=0.01),
        dict(mode="converged", anchor="base", distance="token", normalize=True, margin=1e-3),
        dict(mode="converged", anchor="sum", ridge=0.1, lambda_con=0.0),
        dict(mode="converged", anchor="mean", ridge=0.1),
    ],
)
@pytest.mark.parametrize("n_rows", [(40, 40, 40), (40, 31, 52), (30,), (5, 5, 5), (5, 4, 6)])
def test_factored_closed_form_equals_the_dense_path(cfg, n_rows):
    """Also with fewer rows in all than inputs ((5, 5, 5), (5, 4, 6) against 16 inputs): both paths then solve
    in the span of the rows."""
    from loraclr.merge.contrastive import merge_loraclr

    low, dense = _factored(n_rows)
    config = make_config("loraclr", **cfg)
    f, d = merge_loraclr(low, config), merge_loraclr(dense, config)
    assert "LoRA-factor path" in f.report["note"]  # the factored path ran, with no active hinge
    assert "LoRA-factor" not in d.report["note"]
    assert torch.allclose(f.offset, d.offset, rtol=1e-4, atol=1e-5 * float(d.offset.abs().max()))
    for k in ("loss", "hinge_active", "steps", "converged"):
        assert f.report[k] == pytest.approx(d.report[k], rel=1e-4, abs=1e-9), k
    for k in ("pos_dist", "neg_dist"):
        if d.report[k] and d.report[k][0] is not None:
            assert f.report[k] == pytest.approx(d.report[k], rel=1e-4, abs=1e-4), k  # rounding at an exact fit
    # one concept with the sum anchor: every term is 0 up to float32 rounding of the products with the rows
    tiny = 1e-5 * float(d.offset.norm())
    assert f.report["loss_terms"] == pytest.approx(d.report["loss_terms"], rel=1e-4, abs=tiny)


@pytest.mark.parametrize("distance", ["block", "token"])
def test_factored_path_measures_wide_layers_in_reduced_output_coordinates(distance, monkeypatch):
    """A GEGLU-like layer (outputs 8x the inputs): the hinge check runs in the coordinates of [W0, U] (k =
    in + R instead of out), with the same distances as the dense path's products over all outputs."""
    from loraclr.merge import contrastive as C
    from loraclr.merge.contrastive import converged

    calls = []
    orig = converged._output_coordinates
    monkeypatch.setattr(converged, "_output_coordinates", lambda *a: calls.append(a) or orig(*a))
    low, dense = _factored((40, 40, 40), out=128, inn=16, rank=2)
    config = make_config("loraclr", mode="converged", anchor="mean", ridge=0.1, distance=distance)
    f, d = C.merge_loraclr(low, config), C.merge_loraclr(dense, config)
    assert len(calls) == 1 and "LoRA-factor path" in f.report["note"]
    Lw, Lu = orig(*calls[0])
    assert Lw.shape[1] == Lu.shape[1] <= 16 + 3 * 2
    assert f.report["neg_dist"] == pytest.approx(d.report["neg_dist"], rel=1e-5)
    assert torch.allclose(f.offset, d.offset, rtol=1e-4, atol=1e-5 * float(d.offset.abs().max()))


def test_factored_path_hands_active_hinges_to_the_dense_path():
    """Tiny features put the blocks within the margin: the factored closed form is not the minimiser, so the
    dense majorise-minimise path runs and both inputs give the same result."""
    from loraclr.merge.contrastive import merge_loraclr

    low, dense = _factored(scale=1e-3)
    config = make_config("loraclr", mode="converged", anchor="sum", ridge=0.1)
    f, d = merge_loraclr(low, config), merge_loraclr(dense, config)
    assert f.report["hinge_active"] > 0 and "LoRA-factor" not in f.report["note"]
    # the same iterations up to rounding (dense deltas built from the factors in another order), stopped at tol
    assert torch.allclose(f.offset, d.offset, rtol=1e-4, atol=1e-5 * float(d.offset.abs().max()))
