"""bench/speed.py: the L-BFGS baseline solves Mix-of-Show's least-squares objective; a quick run on tiny
configs writes every (layer shape, N, method) cell, whole-model estimates and ratios that follow from the
measured times, and whole merges with their phases."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def speed(script):
    return script("bench/speed.py", "speed")


def test_lbfgs_reaches_the_exact_least_squares_solution(speed):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 24, 16, 3
    W0 = torch.randn(d_out, d_in, generator=g)
    deltas = [torch.randn(d_out, 2, generator=g) @ torch.randn(2, d_in, generator=g) * 0.3 for _ in range(n)]
    X = [torch.randn(40, d_in, generator=g) * torch.linspace(0.2, 3, d_in) for _ in range(n)]
    K, V = speed.fusion_targets(W0, deltas, X)
    assert K.shape == (3 * 40, d_in) and V.shape == (3 * 40, d_out)
    # independent exact minimiser of ||K W^T - V||^2 (K has full column rank: 120 rows, 24 columns)
    W = torch.linalg.lstsq(K.double(), V.double()).solution.T
    exact = float((K.double() @ W.T - V.double()).pow(2).mean())
    D, rep = speed.lbfgs_fit(K, V, W0, speed.LBFGS_STEPS)
    assert exact * (1 - 1e-5) <= rep["loss"] <= exact * (1 + 1e-4)
    torch.testing.assert_close((W0 + D).double(), W, atol=1e-3, rtol=1e-3)
    assert 0 < rep["iterations"] <= speed.LBFGS_STEPS and rep["evaluations"] >= rep["iterations"]


def test_quick_run_cells_estimates_and_ratios(speed, tmp_path):
    out = tmp_path / "res" / "speed"
    rc = speed.main(["--quick", "--families", "sd1", "--n", "2,3", "--cache", str(tmp_path / "cache"),
                     "--out", str(out)])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    part = res["solve"]["sd1"]
    shapes = part["shapes"]

    from loraclr.models import build_components, default_lora_targets

    n_modules = len(default_lora_targets(build_components("sd1", "tiny", device="meta", with_vae=False)))
    assert sum(s["count"] for s in shapes) == n_modules and len(shapes) < n_modules

    cells = {(c["shape"], c["N"], c["method"]): c for c in part["cells"]}
    assert set(cells) == {(s["key"], n, m) for s in shapes for n in (2, 3) for m in speed.SOLVE_METHODS}
    for c in part["cells"]:
        assert c["seconds"] > 0 and c["measured_s"] > 0
        assert c["peak_rss_mb"] is None or c["peak_rss_mb"] >= 0  # None where /proc/self/clear_refs is closed
        if c["method"] == "paper":  # 2 AdamW steps run, time scaled to the official 50
            assert c["extrapolated"] and c["steps_run"] == 2 and c["steps_official"] == speed.PAPER_STEPS
        if c["method"] in ("sum", "lstsq", "converged"):
            assert not c["extrapolated"] and c["seconds"] == pytest.approx(c["measured_s"])
        if c["method"] == "lstsq":  # the exact solve of the objective every result is scored on
            for m in ("sum", "paper", "lbfgs"):
                other = cells[(c["shape"], c["N"], m)]["lsq_mse"]
                assert c["lsq_mse"] <= other * (1 + 1e-4) + 1e-9

    est = part["summary"]["estimate"]
    count = {s["key"]: s["count"] for s in shapes}
    for n in ("2", "3"):
        row = est[n]["methods"]
        for m in speed.SOLVE_METHODS:
            want = sum(cells[(k, int(n), m)]["seconds"] * count[k] for k in count)
            assert row[m]["seconds"] == pytest.approx(want)
        for b in speed.BASELINES:
            for f in speed.FAST:
                assert est[n]["ratios"][f"{b}/{f}"] == pytest.approx(row[b]["seconds"] / row[f]["seconds"])
    scaling = part["summary"]["scaling_vs_n"]["by_n"]
    assert all(scaling["2"][m]["time"] == 1 for m in speed.SOLVE_METHODS)
    assert scaling["3"]["lstsq"]["time"] == pytest.approx(est["3"]["methods"]["lstsq"]["seconds"]
                                                          / est["2"]["methods"]["lstsq"]["seconds"])

    whole = res["whole"]
    assert [(r["family"], r["N"], r["label"]) for r in whole] == [("sd1", 2, "sum"), ("sd1", 3, "sum")]
    assert all("error" not in r and set(r["timings_s"]) == {"load", "features", "solve", "export"} for r in whole)
    ratios = {r["N"]: r for r in res["whole_ratios"]}
    assert ratios[2]["time_vs_smallest_n"] == 1
    assert ratios[3]["time_vs_smallest_n"] == pytest.approx(
        sum(whole[1]["timings_s"].values()) / sum(whole[0]["timings_s"].values()))

    md = out.with_suffix(".md").read_text()
    assert "## Solve phase, sd1" in md and "| 2 |" in md and "| 3 |" in md and "| sum |" in md
    assert res["meta"]["uptime_start"] and res["meta"]["rows_per_concept"] == 32


def test_cells_predicted_over_budget_are_not_run_and_say_so(speed, tmp_path):
    out = tmp_path / "speed"
    speed.main(["--quick", "--part", "solve", "--families", "sd1", "--n", "2,4", "--solve-methods", "sum,lstsq",
                "--max-cell-s", "1e-9", "--out", str(out)])
    part = json.loads(out.with_suffix(".json").read_text())["solve"]["sd1"]
    for c in part["cells"]:
        if c["N"] == 2:  # nothing to predict from: measured
            assert c["measured_s"] > 0 and "predicted_wall_s" not in c
        else:  # predicted from N = 2 (linear from one point) and not run
            assert c["measured_s"] is None and c["predicted_wall_s"] > 0 and c["extrapolated"]
            assert math.isfinite(c["seconds"])
    assert part["summary"]["estimate"]["4"]["methods"]["lstsq"]["predicted_not_run"] == len(part["shapes"])
    assert "†" in out.with_suffix(".md").read_text()


def test_official_rows_follow_the_block_resolution(speed):
    from loraclr.models import build_components

    for family, side in (("sd1", 64), ("sdxl", 128)):  # native latent side: 512 / 1024 px
        cfg = dict(build_components(family, "real", device="meta", with_vae=False)["unet"].config)
        assert cfg["sample_size"] == side

        def rows(key, cfg=cfg):
            return speed.official_rows(key, cfg, 20)

        assert rows("text_encoder.text_model.encoder.layers.0.mlp.fc1") == speed.OFFICIAL_TE_ROWS
        assert rows("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v") == speed.OFFICIAL_KV_ROWS
        levels = len(cfg["down_block_types"])
        assert rows("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == (side // 2) ** 2 * 20
        assert rows("unet.mid_block.attentions.0.proj_in") == (side // 2 ** (levels - 1)) ** 2 * 20
        # the up path mirrors the down path: the last up block works at the first down block's resolution
        assert rows(f"unet.up_blocks.{levels - 1}.attentions.0.proj_out") == side**2 * 20
    with pytest.raises(ValueError, match="unet.conv_in"):
        speed.official_rows("unet.conv_in", cfg, 20)


def test_official_rows_run_gives_each_shape_its_rows(speed, tmp_path):
    out = tmp_path / "speed"
    speed.main(["--quick", "--part", "solve", "--families", "sd1", "--n", "2", "--rows", "official",
                "--timesteps", "1", "--solve-methods", "sum,default,paper", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    part = res["solve"]["sd1"]
    rows = {s["key"]: s["rows"] for s in part["shapes"]}
    assert speed.OFFICIAL_KV_ROWS in rows.values() and speed.OFFICIAL_TE_ROWS in rows.values()
    for c in part["cells"]:
        assert c["rows"] == rows[c["shape"]]
    # shapes at two resolutions stay two groups (their rows differ), so every module is counted once
    from loraclr.models import build_components, default_lora_targets

    n_modules = len(default_lora_targets(build_components("sd1", "tiny", device="meta", with_vae=False)))
    assert sum(s["count"] for s in part["shapes"]) == n_modules
    est = part["summary"]["estimate"]["2"]
    assert est["ratios"]["paper/default"] == pytest.approx(est["methods"]["paper"]["seconds"]
                                                          / est["methods"]["default"]["seconds"])
    assert res["meta"]["official_timesteps"] == 1 and res["meta"]["rows_per_concept"] == "official"
    assert "official feature collection's rows" in out.with_suffix(".md").read_text()
