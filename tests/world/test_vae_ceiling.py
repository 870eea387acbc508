"""scripts/vae_ceiling.py: clean held-out renders are recognised, round trips are scored, bad names are refused."""

import pytest


def test_clean_renders_recognised_and_round_trip_scored(script, tmp_path):
    mod = script("scripts/vae_ceiling.py", "vae_ceiling")
    res = mod.ceiling(["rika", "tobi"], n=8)
    assert set(res) == {"rika", "tobi"}
    for rates in res.values():
        assert rates["clean"] >= 0.75  # the evaluator recognises clean one-character renders (1.0 at n = 200)
        assert 0.0 <= rates["vae"] <= 1.0
    assert res["rika"]["vae"] >= 0.75  # rika survives the VAE (1.0 at n = 200)
    md = tmp_path / "c.md"
    assert mod.main(["--n", "4", "--concepts", "rika", "--md", str(md)]) == 0
    assert "| rika |" in md.read_text()


def test_unknown_concept_named(script):
    mod = script("scripts/vae_ceiling.py", "vae_ceiling")
    with pytest.raises(ValueError, match="nosuch"):
        mod.ceiling(["nosuch"], n=2)
