"""The shipped concept manifest records what ``scripts/train_concepts.py``'s PLAN trains now: changing a step,
warmup or rate factor in the plan without retraining the file (or the reverse) fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "src" / "loraclr" / "world" / "assets" / "concepts" / "manifest.json"


@pytest.fixture(scope="module")
def plan(script):
    return script("scripts/train_concepts.py", "train_concepts_plan")


def test_shipped_manifest_matches_the_plan(plan):
    doc = json.loads(SHIPPED.read_text())
    steps = doc["budget"]["steps"]
    entries = {e["name"]: e for e in doc["concepts"]}
    assert list(entries) == [row[0] for row in plan.PLAN]
    for name, kind, fmt, rank, alpha in plan.PLAN:
        e = entries[name]
        assert (e["kind"], e["format"], e["rank"], e["alpha"]) == (kind, fmt, rank, alpha), name
        assert e["steps"] == steps * plan.STEP_FACTOR.get(name, 1), name
        assert e["seed"] == plan.SEED_OFFSET.get(name, 0), name  # the world is trained with --seed 0
        assert e["lr"] == pytest.approx(plan.LR[0] * plan.LR_FACTOR.get(name, 1)), name
        assert (SHIPPED.parent / e["file"]).is_file(), name
        assert e.get("strength", 1.0) == plan.STRENGTH.get(name, 1.0), name
        if e["format"] == "kohya" and name in plan.STRENGTH:  # the file says it too
            from safetensors import safe_open

            from loraclr.io.write import kohya_network_value

            with safe_open(SHIPPED.parent / e["file"], "pt") as f:
                assert float(f.metadata()["loraclr.strength"]) == plan.STRENGTH[name], name
                alphas = (float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha"))
                assert f.metadata()["ss_network_alpha"] == kohya_network_value(alphas), name  # as the writer says
        assert e.get("text_encoder_lora", True) == (name not in plan.NO_TEXT_LORA), name
        if e["format"] == "edlora":  # the file holds a text-encoder LoRA exactly when the plan trains one
            import torch

            raw = torch.load(SHIPPED.parent / e["file"], weights_only=True)
            assert bool(raw["params"]["text_encoder"]) == (name not in plan.NO_TEXT_LORA), name
        if e["tokens"]:  # identities: learned tokens, trained alone first for the plan's warmup
            assert e["token_warmup"] == plan.TOKEN_WARMUP * plan.WARMUP_FACTOR.get(name, 1), name
        else:
            assert "token_warmup" not in e, name


def test_warmup_factors_name_identities_of_the_plan(plan):
    identities = {row[0] for row in plan.PLAN if row[1] == "identity"}
    assert set(plan.WARMUP_FACTOR) <= identities
    assert all(isinstance(f, int) and f >= 1 for f in plan.WARMUP_FACTOR.values())
    assert set(plan.STRENGTH) <= identities and all(0 < s <= 1 for s in plan.STRENGTH.values())
