"""The per-layer driver (solve_layers, which the merge and merge_offsets both run) and make_config."""

from __future__ import annotations

import pytest
import torch

from loraclr.merge.api import METHODS, LayerProblem, get_method
from loraclr.merge.contrastive import LoraclrConfig
from loraclr.merge.methods import make_config, merge_offsets


def _problems(k=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(k):
        W0 = torch.randn(4, 3, generator=g)
        deltas = [torch.randn(4, 3, generator=g) for _ in range(2)]
        xs = [torch.randn(5, 3, generator=g) for _ in range(2)]
        out.append(LayerProblem(f"unet.layer{i}", W0, deltas, X=xs, concept_names=["a", "b"]))
    return out


def test_registry_lists_every_method():
    get_method("sum")
    assert {"loraclr", "lstsq", "sum", "average", "svd", "ties", "dare"} <= set(METHODS)
    assert get_method("loraclr").needs_features and get_method("lstsq").needs_features


def test_registry_is_the_one_source_of_presets_labels_and_help():
    """The recipe's preset, the CLI's help and the demo's labels are read from the registry entries."""
    import dataclasses

    from loraclr.cli import build_parser
    from loraclr.merge.api import MergeMethod, all_methods, resolve_settings
    from loraclr.recipe import RECOMMENDED, MethodSpec

    methods = all_methods()
    assert RECOMMENDED == {n: dict(m.preset) for n, m in methods.items() if m.preset} == {
        "loraclr": {"mode": "converged", "anchor": "mean", "ridge": 0.1}}
    assert MethodSpec("loraclr", {"margin": 0.25}).resolved == {**RECOMMENDED["loraclr"], "margin": 0.25}
    assert MethodSpec("loraclr", {"mode": "paper"}).resolved == {"mode": "paper"}  # a mode: no preset
    assert resolve_settings("not-registered", {"x": 1}) == {"x": 1}
    assert get_method("loraclr").label == "LoRACLR merge" and get_method("none").label == "tokens only"
    assert get_method("ties").label == "ties merge"  # the default label
    assert all(m.summary and m.reference for m in methods.values())
    help_text = " ".join(build_parser(["merge"])._subparsers._group_actions[0].choices["merge"].format_help().split())
    for m in methods.values():
        assert f"{m.name} = {' '.join(m.summary.split())}" in help_text
    # keyword fields beyond the first five; the preset cannot be changed through the entry
    with pytest.raises(TypeError):
        MergeMethod("x", None, object, False, "ref", "summary")
    spec = MergeMethod(name="x", fn=None, config_cls=object, needs_features=False, reference="r", preset={"a": 1})
    with pytest.raises(TypeError):
        spec.preset["a"] = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.label = "y"


def test_make_config_defaults_and_overrides():
    cfg = make_config("loraclr")
    assert (cfg.mode, cfg.margin, cfg.lambda_con, cfg.lambda_mse, cfg.lambda_reg) == (
        "paper",
        0.5,
        1,
        0.1,
        0.001,
    )
    assert (cfg.lr, cfg.weight_decay, cfg.steps) == (1e-4, 1e-4, 50)
    assert make_config("loraclr", mode="paper", normalize=True).normalize is True
    with pytest.raises(ValueError, match="'lamda_reg'"):
        make_config("loraclr", lamda_reg=0.1)


def test_merge_offsets_runs_generators_with_dict_config_and_callback():
    seen = []
    problems = _problems()
    res = merge_offsets(
        (p for p in problems),
        "loraclr",
        {"mode": "paper", "steps": 3},
        callback=lambda key, step, loss: seen.append((key, step)),
        progress=False,
    )
    assert list(res) == [p.key for p in problems]
    assert seen == [(p.key, s) for p in problems for s in range(3)]
    res2 = merge_offsets(problems, "loraclr", LoraclrConfig(mode="paper", steps=3), progress=False)
    for k in res:
        assert torch.equal(res[k].offset, res2[k].offset)
    for r in res.values():
        assert {"loss", "converged", "pos_dist", "neg_dist", "hinge_active", "steps"} <= set(r.report)


def test_merge_offsets_errors():
    problems = _problems(2)
    with pytest.raises(ValueError, match="twice"):
        merge_offsets([problems[0], problems[0]], "sum", progress=False)
    with pytest.raises(ValueError, match="LstsqConfig or a mapping"):
        merge_offsets(problems, "lstsq", LoraclrConfig(), progress=False)
    bare = LayerProblem("unet.nofeat", torch.zeros(2, 2), [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="unet.nofeat.*needs features"):
        merge_offsets([bare], "loraclr", progress=False)
    assert torch.equal(merge_offsets([bare], "sum", progress=False)["unet.nofeat"].offset, torch.ones(2, 2))


def test_feature_store_style_problems_with_missing_rows():
    """Feature stores may hold X = [None, ...] where only Grams were kept: Gram-capable solvers use them."""
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(4, 3, generator=g)
    xs = [3 * torch.randn(8, 3, generator=g) for _ in range(2)]
    deltas = [torch.randn(4, 3, generator=g) for _ in range(2)]
    full = LayerProblem("unet.l", W0, deltas, X=xs)
    stats = LayerProblem("unet.l", W0, deltas, X=[None, None], gram=[x.T @ x for x in xs], n_rows=[8, 8])
    for method, cfg in (("lstsq", None), ("loraclr", {"mode": "converged"})):
        a = merge_offsets([full], method, cfg, progress=False)["unet.l"].offset
        b = merge_offsets([stats], method, cfg, progress=False)["unet.l"].offset
        assert torch.allclose(a, b, atol=1e-5), method
    with pytest.raises(ValueError, match="unet.l.*raw feature rows"):
        merge_offsets([stats], "loraclr", {"mode": "paper"}, progress=False)


def test_fidelity_on_evenly_spaced_rows_against_a_direct_computation():
    from loraclr.merge.fidelity import fidelity

    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(6, 4, generator=g)
    deltas = [torch.randn(6, 4, generator=g) for _ in range(2)]
    xs = [torch.randn(9, 4, generator=g), torch.randn(3, 4, generator=g)]
    p = LayerProblem("unet.layer", W0, deltas, X=xs, concept_names=["a", "b"])
    D = torch.randn(6, 4, generator=g)

    def direct(X, dW):  # float64, independent of the implementation
        X, dW, Dd, tot = X.double(), dW.double(), D.double(), sum(d.double() for d in deltas)
        target = (X @ (W0.double() + dW).T).norm()
        return float((X @ (Dd - dW).T).norm() / target), float((X @ (tot - dW).T).norm() / target)

    full = fidelity(p, D, None)
    for i in range(2):
        assert (full["merged"][i], full["sum"][i]) == pytest.approx(direct(xs[i], deltas[i]), rel=1e-5)
    cut = fidelity(p, D, 3)  # concept a: rows 0, 4, 8 of 9; concept b (3 rows) whole
    assert (cut["merged"][0], cut["sum"][0]) == pytest.approx(direct(xs[0][[0, 4, 8]], deltas[0]), rel=1e-5)
    assert (cut["merged"][1], cut["sum"][1]) == pytest.approx((full["merged"][1], full["sum"][1]), rel=1e-6)


def test_merge_and_merge_offsets_run_the_same_driver():
    """The production loop (merging._solve) and merge_offsets give the same offsets: one driver."""
    from loraclr.merging import _solve

    problems = _problems(3)
    want = merge_offsets(problems, "lstsq", progress=False)
    reports: dict = {}
    got = _solve(iter(problems), get_method("lstsq"), make_config("lstsq"), "all", False, reports)
    assert set(got) == set(want) == set(reports)
    for k in want:
        assert torch.equal(got[k], want[k].offset.float().reshape(got[k].shape))


def test_fidelity_from_lora_factors_equals_the_dense_computation():
    """Factored deltas (LowRankDeltas, one concept with rank 0) give the dense path's numbers."""
    from loraclr.merge.api import LowRankDeltas
    from loraclr.merge.fidelity import fidelity

    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(7, 5, generator=g)
    ups = [torch.randn(7, r, generator=g) for r in (2, 0, 3)]
    downs = [torch.randn(r, 5, generator=g) for r in (2, 0, 3)]
    factors = LowRankDeltas(ups, downs, [0.5, 1.0, 2.0])
    xs = [torch.randn(6, 5, generator=g) for _ in range(3)]
    D = torch.randn(7, 5, generator=g)
    low = fidelity(LayerProblem("unet.layer", W0, factors, X=xs), D, None)
    dense = fidelity(LayerProblem("unet.layer", W0, [factors[i] for i in range(3)], X=xs), D, None)
    for k in ("merged", "sum"):
        assert low[k] == pytest.approx(dense[k], rel=1e-5)
