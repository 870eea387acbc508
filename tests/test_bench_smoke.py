"""bench/merge_speed.py runs end to end on the tiny SD1 config (one method, two concepts) and writes results
with the merge's phase times and a per-process peak RSS."""

from __future__ import annotations

import json


def test_merge_speed_smoke(tmp_path, script):
    bench = script("bench/merge_speed.py", "merge_speed")
    out = tmp_path / "res" / "merge_speed"
    rc = bench.main(["--quick", "--size", "tiny", "--methods", "sum", "--threads", "1",
                     "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    (run,) = json.loads(out.with_suffix(".json").read_text())["runs"]
    (r,) = run["results"]
    assert r["label"] == "sum" and "error" not in r
    assert set(r["timings_s"]) == {"load", "features", "solve", "export"}
    assert r["n_layers"] == sum(run["meta"]["lora_modules"].values()) > 0
    assert 0 < r["peak_rss_gb"] < 4
    assert run["meta"]["issue_configuration"] is False  # a smoke run is never reported as the real thing
    assert "| sum |" in out.with_suffix(".md").read_text()
