"""lstsq (Mix-of-Show gradient fusion objective, exact): checked against row-level numpy least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraclr.merge.api import LayerProblem
from loraclr.merge.methods import merge_offsets


def _merge(problem, **cfg):
    return merge_offsets([problem], "lstsq", cfg or None, progress=False)[problem.key]


def _rand(shape, g, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


def test_one_concept_strength_one_is_exact_delta():
    g = torch.Generator().manual_seed(0)
    W0, dW, X = _rand((6, 5), g), _rand((6, 5), g, 0.1), _rand((20, 5), g)
    r = _merge(LayerProblem("unet.a", W0, [dW], X=[X]))
    assert torch.allclose(r.offset, dW, atol=1e-5)
    assert r.report["loss"] == pytest.approx(0.0, abs=1e-9)


def test_recovers_true_weight_from_consistent_partial_views():
    """Each concept sees only a 3-D subspace of the 6-D input and its delta is wrong outside it, but all
    targets agree with one W_true: the merge must recover W_true exactly."""
    g = torch.Generator().manual_seed(1)
    out, inn = 4, 6
    W0, W_true = _rand((out, inn), g), _rand((out, inn), g)
    basis = torch.linalg.qr(_rand((inn, inn), g))[0]
    deltas, xs = [], []
    for k in range(2):
        span = basis[:, 3 * k : 3 * k + 3]  # (in, 3)
        X = _rand((10, 3), g) @ span.T  # rows in the span only
        null = torch.eye(inn) - span @ span.T
        deltas.append((W_true - W0) + _rand((out, inn), g) @ null)  # arbitrary where this concept is blind
        xs.append(X)
    r = _merge(LayerProblem("unet.a", W0, deltas, X=xs))
    assert torch.allclose(W0 + r.offset, W_true, atol=1e-4)
    assert r.report["unexcited_dims"] == 0


def test_matches_numpy_lstsq_and_keeps_w0_on_unexcited_directions():
    g = torch.Generator().manual_seed(2)
    out, inn = 5, 8
    W0 = _rand((out, inn), g)
    span = torch.linalg.qr(_rand((inn, 5), g))[0]  # inputs live in a 5-D subspace of R^8
    xs = [_rand((n, 5), g) @ span.T for n in (4, 7, 3)]
    deltas = [_rand((out, inn), g, 0.3) for _ in xs]
    r = _merge(LayerProblem("unet.a", W0, deltas, X=xs))
    # independent: minimum-norm least squares on the stacked rows, min ||X D^T - T||, T = X_i dW_i^T
    Xs = np.concatenate([x.double().numpy() for x in xs])
    T = np.concatenate([(x.double() @ d.double().T).numpy() for x, d in zip(xs, deltas, strict=True)])
    # X is float32, so it leaks ~1e-8 outside the span: cut singular values below 1e-4 of the largest
    golden = np.linalg.lstsq(Xs, T, rcond=1e-4)[0].T  # (out, in), min-norm
    np.testing.assert_allclose(r.offset.numpy(), golden, atol=1e-4)
    perp = torch.eye(inn) - span @ span.T
    assert torch.allclose(r.offset @ perp, torch.zeros(out, inn), atol=1e-5)  # W0 kept where nothing excites
    assert r.report["unexcited_dims"] == 3
    mse = ((Xs @ golden.T - T) ** 2).sum() / (out * Xs.shape[0])
    assert r.report["loss"] == pytest.approx(mse, rel=1e-4, abs=1e-9)


def test_gram_only_equals_rows_and_order_invariance():
    g = torch.Generator().manual_seed(3)
    W0 = _rand((6, 5), g)
    xs = [_rand((n, 5), g) for n in (9, 4, 12)]
    deltas = [_rand((6, 5), g, 0.2) for _ in xs]
    a = _merge(LayerProblem("unet.a", W0, deltas, X=xs)).offset
    grams = [x.T @ x for x in xs]
    b = _merge(LayerProblem("unet.a", W0, deltas, gram=grams, n_rows=[9, 4, 12])).offset
    assert torch.allclose(a, b, atol=1e-5)
    perm = [2, 0, 1]
    c = _merge(LayerProblem("unet.a", W0, [deltas[i] for i in perm], X=[xs[i] for i in perm])).offset
    assert torch.allclose(a, c, atol=1e-5)


def test_missing_features_name_the_layer():
    p = LayerProblem("text_encoder.layer.q", torch.zeros(3, 3), [torch.ones(3, 3)])
    with pytest.raises(ValueError, match="text_encoder.layer.q"):
        _merge(p)
    p = LayerProblem("unet.k", torch.zeros(3, 3), [torch.ones(3, 3)], gram=[torch.eye(3)])
    with pytest.raises(ValueError, match="n_rows"):
        _merge(p)


def test_fewer_rows_than_inputs_is_minimum_norm_least_squares():
    """12 rows in total for 30 inputs: solved in the rows' span, equal to numpy's minimum-norm solution."""
    g = torch.Generator().manual_seed(4)
    out, inn = 6, 30
    W0 = _rand((out, inn), g)
    xs = [_rand((n, inn), g) for n in (5, 4, 3)]
    deltas = [_rand((out, inn), g, 0.3) for _ in xs]
    r = _merge(LayerProblem("unet.k", W0, deltas, X=xs))
    Xs = np.concatenate([x.double().numpy() for x in xs])
    T = np.concatenate([(x.double() @ d.double().T).numpy() for x, d in zip(xs, deltas, strict=True)])
    golden = np.linalg.lstsq(Xs, T, rcond=1e-4)[0].T
    np.testing.assert_allclose(r.offset.numpy(), golden, atol=1e-4)
    assert r.report["unexcited_dims"] == inn - 12
    assert r.report["loss"] == pytest.approx(0.0, abs=1e-9)  # 12 rows, 30 unknowns per output: exact fit
