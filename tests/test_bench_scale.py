"""bench/scale.py: the makespan model's pieces against hand-computed values, and a quick run on the tiny config
that records per-stage costs and predicts a merge from them."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def scale(script):
    return script("bench/scale.py", "scale")


def test_power_fit_recovers_the_exponent(scale):
    c, e = scale.power_fit([(2, 3 * 2**1.7), (6, 3 * 6**1.7), (12, 3 * 12**1.7)])
    assert e == pytest.approx(1.7) and c == pytest.approx(3.0)
    assert scale.power_fit([(4, 8.0)]) == (2.0, 1.0)  # one point: linear through it


def test_longest_first_schedules_on_the_least_loaded_worker(scale):
    # by hand, longest first: 7 -> w0 (7); 5 -> w1 (5); 4 -> w1 (9); 3 -> w0 (10); 1 -> w1 (10)
    assert scale.longest_first([3, 7, 1, 5, 4], 2) == 10
    assert scale.longest_first([3, 7, 1, 5, 4], 1) == 20
    assert scale.longest_first([3, 7, 1], 8) == 7


def test_makespan_adds_features_in_rounds_and_scheduled_solves(scale):
    stages = {"a": scale.StageCosts(feature_s=2.0, layers=[(1.0, 1.0), (0.5, 2.0)])}
    # N = 4 on 2 workers: 2 rounds of features (2 x 2 s); solves 4 s and 8 s on 2 workers -> 8 s
    p = scale.makespan(stages, 4, 2, start_s=1.0, export_s=3.0)
    assert p["features"] == 4.0 and p["solve"] == 8.0 and p["total"] == 16.0
    q = scale.makespan(stages, 4, 2, start_s=1.0, export_s=3.0, overhead_s=0.5)
    assert q["features"] == 2 * 2.5 and q["solve"] == 8.5


def test_quick_run_records_stage_costs_and_checks_the_model(scale, tmp_path):
    out = tmp_path / "scale"
    rc = scale.main(["--quick", "--n", "2", "--executors", "local", "--project-n", "2,50", "--project-workers",
                     "1,4", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    (run,) = res["whole"]
    assert run["N"] == 2 and "error" not in run
    assert set(run["stages"]) == {"text_encoder", "cross_attention", "spatial"}
    assert all(s["features_s"] > 0 and s["solve_s"] > 0 for s in run["stages"].values())
    assert sum(s["features_s"] for s in run["stages"].values()) == pytest.approx(run["timings_s"]["features"],
                                                                                abs=0.01)
    proj = {(p["N"], p["workers"]): p for p in res["projection"]}
    # at the measured N on one worker the model gives back the measured phases (no overhead from local runs)
    p = proj[(2, 1)]
    assert p["features"] == pytest.approx(run["timings_s"]["features"], rel=0.01, abs=0.1)
    assert p["solve"] == pytest.approx(run["timings_s"]["solve"], rel=0.01, abs=0.1)
    assert proj[(50, 4)]["features"] == pytest.approx(math.ceil(50 / 4) / 2 * run["timings_s"]["features"],
                                                      rel=0.01, abs=0.5)
    assert "Projection" in out.with_suffix(".md").read_text()
