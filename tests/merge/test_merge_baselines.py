"""Algebra of the feature-free merges (sum, average, svd, ties, dare, none), against hand / numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraclr.merge.api import LayerProblem, LowRankDeltas, get_method
from loraclr.merge.methods import make_config, merge_offsets

FEATURE_FREE = ["sum", "average", "svd", "ties", "dare", "none"]


def _problem(n=3, out=7, inn=5, rank=2, seed=0, names=None):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(out, inn, generator=g)
    deltas = [torch.randn(out, rank, generator=g) @ torch.randn(rank, inn, generator=g) for _ in range(n)]
    names = names or [f"c{i}" for i in range(n)]
    return LayerProblem("unet.layer", W0, deltas, concept_names=names, ranks=[rank] * n)


def _merge(problem, method, **cfg):
    return merge_offsets([problem], method, cfg or None, progress=False)[problem.key]


def test_all_registered_and_feature_free():
    for name in FEATURE_FREE:
        spec = get_method(name)
        assert spec.needs_features is False
        assert spec.reference


def test_none_keeps_the_base_weight_whatever_the_deltas():
    p = _problem(n=3)
    r = _merge(p, "none")
    assert torch.equal(r.offset, torch.zeros_like(p.W0)) and r.offset.dtype == torch.float32
    assert _merge(_problem(n=2, seed=1), "sum").offset.abs().max() > 0  # the same deltas do move other methods


@pytest.mark.parametrize("method", FEATURE_FREE + ["lstsq", "loraclr"])
def test_zero_concepts_give_base_weight(method):
    p = LayerProblem("unet.layer", torch.randn(4, 3), [], X=[], concept_names=[])
    r = _merge(p, method)
    assert torch.equal(r.offset, torch.zeros(4, 3))


def test_sum_one_concept_is_exact_delta():
    p = _problem(n=1)
    assert torch.equal(_merge(p, "sum").offset, p.deltas[0])


def test_sum_and_average_values():
    p = _problem(n=3)
    d = [x.numpy().astype(np.float64) for x in p.deltas]
    np.testing.assert_allclose(_merge(p, "sum").offset.numpy(), d[0] + d[1] + d[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        _merge(p, "average").offset.numpy(), (d[0] + d[1] + d[2]) / 3, rtol=1e-6, atol=1e-6
    )


def test_svd_is_best_low_rank_approximation_of_the_sum():
    p = _problem(n=2, out=9, inn=8, rank=2)  # sum has rank 4
    total = sum(x.numpy().astype(np.float64) for x in p.deltas)
    u, s, vt = np.linalg.svd(total)
    golden = (u[:, :2] * s[:2]) @ vt[:2]
    r = _merge(p, "svd")  # rank defaults to max(ranks) = 2 (PEFT's default)
    assert r.report["rank"] == 2
    np.testing.assert_allclose(r.offset.numpy(), golden, rtol=1e-4, atol=1e-5)
    assert r.report["rel_error"] == pytest.approx(
        np.sqrt((s[2:] ** 2).sum()) / np.linalg.norm(total), rel=1e-4
    )
    # without declared ranks the input rank is estimated numerically; rank 4 reproduces the sum exactly
    p.ranks = None
    assert _merge(p, "svd").report["rank"] == 2
    np.testing.assert_allclose(_merge(p, "svd", rank=4).offset.numpy(), total, rtol=1e-4, atol=1e-5)


def test_ties_hand_example():
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    d2 = torch.tensor([[-2.0, -4.0], [1.0, 0.1]])
    p = LayerProblem("unet.layer", torch.zeros(2, 2), [d1, d2])
    # density 0.5 keeps {3, 2} of d1 and {-4, -2} of d2; elected signs (+, -, +, +); disjoint means:
    # (0,0): only 3 agrees; (0,1): -4; (1,0): nothing kept -> 0; (1,1): 2
    out = _merge(p, "ties", density=0.5).offset
    assert torch.equal(out, torch.tensor([[3.0, -4.0], [0.0, 2.0]]))


def test_ties_sign_methods_differ_as_defined():
    ds = [torch.tensor([[5.0]]), torch.tensor([[-1.0]]), torch.tensor([[-1.0]])]
    p = LayerProblem("unet.layer", torch.zeros(1, 1), ds)
    assert float(_merge(p, "ties", density=1.0).offset) == 5.0  # total: 5 - 1 - 1 > 0
    assert float(_merge(p, "ties", density=1.0, majority_sign_method="frequency").offset) == -1.0


def test_dare_drop_and_rescale():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(100, 100, generator=g)
    p = LayerProblem("unet.layer", torch.zeros(100, 100), [d])
    out = _merge(p, "dare", density=0.5).offset
    kept = out != 0
    assert 0.47 < kept.float().mean().item() < 0.53
    assert torch.allclose(out[kept], 2 * d[kept])  # survivors divided by the density
    assert torch.equal(out, _merge(p, "dare", density=0.5).offset)  # seeded: reproducible
    assert not torch.equal(out, _merge(p, "dare", density=0.5, seed=1).offset)
    assert torch.equal(_merge(p, "dare", density=1.0).offset, d)


@pytest.mark.parametrize("method", [m for m in FEATURE_FREE if m != "none"])  # none: always 0, tested above
@pytest.mark.parametrize("extra", [{}, {"sign_election": True}])
def test_concept_order_does_not_matter(method, extra):
    if extra and method != "dare":
        pytest.skip("option only for dare")
    p = _problem(n=4)
    perm = [2, 0, 3, 1]
    q = LayerProblem(
        p.key,
        p.W0,
        [p.deltas[i] for i in perm],
        concept_names=[p.concept_names[i] for i in perm],
        ranks=[p.ranks[i] for i in perm],
    )
    a, b = _merge(p, method, **extra).offset, _merge(q, method, **extra).offset
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    assert a.abs().sum() > 0


def test_config_validation_and_errors():
    with pytest.raises(ValueError, match="density"):
        make_config("ties", density=0.0)
    with pytest.raises(ValueError, match="bogus"):
        make_config("dare", bogus=1)
    with pytest.raises(ValueError, match="unknown merge method"):
        make_config("nope")
    bad = LayerProblem("unet.bad", torch.zeros(2, 3), [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="unet.bad"):
        _merge(bad, "sum")
    nan = LayerProblem("unet.nan", torch.zeros(2, 2), [torch.full((2, 2), float("nan"))])
    with pytest.raises(ValueError, match="unet.nan"):
        _merge(nan, "average")


def _low_rank(n=3, out=7, inn=5, rank=2, seed=1):
    """The same deltas as a dense list and as LowRankDeltas (one concept of rank 0: no LoRA at the layer)."""
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(out, rank, generator=g) for _ in range(n)] + [torch.zeros(out, 0)]
    downs = [torch.randn(rank, inn, generator=g) for _ in range(n)] + [torch.zeros(0, inn)]
    scales = [0.5 * (i + 1) for i in range(n)] + [1.0]
    return LowRankDeltas(ups, downs, scales), [s * (u @ d) for u, d, s in zip(ups, downs, scales, strict=True)]


def test_low_rank_deltas_are_the_dense_deltas():
    lr, dense = _low_rank()
    assert len(lr) == len(dense) == 4
    for a, b in zip(lr, dense, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(lr[3], torch.zeros(7, 5))


@pytest.mark.parametrize("method", FEATURE_FREE)
def test_low_rank_deltas_merge_like_dense(method):
    """Every feature-free method gives the same merge from factors as from the dense deltas (sum and average
    from one product of the concatenated factors; the others through the materialised deltas)."""
    lr, dense = _low_rank()
    W0 = torch.randn(7, 5)
    names = [f"c{i}" for i in range(4)]
    a = _merge(LayerProblem("unet.layer", W0, lr, concept_names=names), method).offset
    b = _merge(LayerProblem("unet.layer", W0, dense, concept_names=names), method).offset
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if method == "sum":  # against an independent float64 sum
        golden = sum(d.double() for d in dense)
        torch.testing.assert_close(a.double(), golden, rtol=1e-6, atol=1e-6)


def test_low_rank_deltas_checked_on_factors():
    lr, _ = _low_rank()
    lr.downs[1] = lr.downs[1].clone()
    lr.downs[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"unet.layer.*'c1'.*NaN"):
        _merge(LayerProblem("unet.layer", torch.zeros(7, 5), lr, concept_names=["c0", "c1", "c2", "c3"]), "sum")
    lr, _ = _low_rank()
    with pytest.raises(ValueError, match=r"factors of concept #0 have shapes"):
        _merge(LayerProblem("unet.layer", torch.zeros(7, 6), lr), "sum")
