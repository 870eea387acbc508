"""Metric functions on hand-built embeddings, and region cropping (values derived by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from loraclr.evaluate import metrics, regions


def test_cosine_and_distances_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert metrics.cosine(a, b).tolist() == pytest.approx([1.0, 0.0, 1 / math.sqrt(2)])
    d = metrics.distances(a, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1 - 1 / math.sqrt(2)] * 2])
    assert torch.allclose(d, expected, atol=1e-6)


def test_reference_embedding_is_normalised_mean():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.reference_embedding(e).tolist() == pytest.approx([1 / math.sqrt(2)] * 2)


def test_recognised_threshold_and_strictness():
    dist = torch.tensor([[0.10, 0.50], [0.30, 0.20], [0.25, 0.90]])
    target = torch.tensor([0, 0, 0])
    # row 0: own 0.10 < 0.2 and nearest; row 1: own 0.30 > 0.2; row 2: own 0.25 > 0.2
    assert metrics.recognised(dist, target, 0.2).tolist() == [True, False, False]
    # threshold 0.35: row 1 is under it but identity 1 is nearer -> strict rejects, loose accepts
    assert metrics.recognised(dist, target, 0.35).tolist() == [True, False, True]
    assert metrics.recognised(dist, target, 0.35, strict=False).tolist() == [True, True, True]


def test_nan_embedding_is_never_recognised():
    dist = torch.tensor([[float("nan"), float("nan")]])
    assert metrics.recognised(dist, torch.tensor([0]), 10.0).tolist() == [False]


def test_threshold_at_far():
    imp = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
    t = metrics.threshold_at_far(imp, 0.05)
    assert t == pytest.approx(0.05)
    assert float((imp < t).float().mean()) == pytest.approx(0.05)


def test_equal_error_threshold_separable_and_overlapping():
    t, rate = metrics.equal_error_threshold(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9]))
    assert rate == 0.0 and 0.2 < t <= 0.8 + 1e-6
    # genuine 0.1..0.4, impostor 0.3..0.6: at 0.35 one of four of each is on the wrong side
    t, rate = metrics.equal_error_threshold(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.3, 0.4, 0.5, 0.6]))
    assert rate == pytest.approx(0.25)


def test_retrieval_top1():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # rows 1 and 2 swapped
    assert metrics.retrieval_top1(img, txt) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert metrics.retrieval_top1(img, img) == (1.0, 1.0)


def test_mean_ci():
    assert metrics.mean_ci(torch.full((10,), 0.7)) == pytest.approx((0.7, 0.7, 0.7))
    v = torch.tensor([0.0] * 50 + [1.0] * 50)
    m, lo, hi = metrics.mean_ci(v, n_boot=2000, seed=1)
    assert m == 0.5
    # binomial standard error sqrt(.25/100) = .05: the 95 % interval is about +-0.1
    assert 0.38 < lo < 0.44 and 0.56 < hi < 0.62
    assert metrics.mean_ci(v, seed=3) == metrics.mean_ci(v, seed=3)
    with pytest.raises(ValueError):
        metrics.mean_ci(torch.tensor([]))


def test_crop_resize_is_exact_on_pixel_aligned_boxes():
    x = torch.rand(2, 3, 64, 64)
    full = regions.crop_resize(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), 64)
    assert torch.allclose(full, x, atol=1e-5)
    quarter = regions.crop_resize(x, torch.tensor([[0.5, 0.25, 1.0, 0.75]] * 2), 32)
    assert torch.allclose(quarter, x[:, :, 16:48, 32:64], atol=1e-5)


def test_regions():
    assert regions.region(2, "left") == (0.0, 0.25, 0.5, 1.0)
    assert regions.slots_for(3) == ("left", "middle", "right")
    with pytest.raises(ValueError, match="middle"):
        regions.region(2, "middle")
