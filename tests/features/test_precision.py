"""The feature run's precision: "auto" autocasts to bf16 only where the device computes it natively."""

from __future__ import annotations

import pytest
import torch

from loraclr.features import collect
from loraclr.recipe import FeatureSettings, Recipe


def _autocast_dtype(precision: str) -> torch.dtype | None:
    with collect._autocast(precision, torch.device("cpu")):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(native, monkeypatch):
    chosen = torch.bfloat16 if native else torch.float32
    monkeypatch.setattr(collect, "choose_precision", lambda name, device: chosen)
    assert _autocast_dtype("auto") == (torch.bfloat16 if native else None)


def test_explicit_precisions_are_kept(monkeypatch):
    monkeypatch.setattr(collect, "choose_precision", lambda name, device: pytest.fail("auto was not asked for"))
    assert _autocast_dtype("float32") is None
    assert _autocast_dtype("bfloat16") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_recipe_accepts_auto_and_refuses_unknown(tmp_path):
    import dataclasses

    from loraclr.recipe import BaseModel, Concept

    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")
    recipe = Recipe(base=BaseModel(str(tmp_path)), concepts=(Concept(name="a", lora=str(lora), trigger="a"),),
                    features=FeatureSettings(precision="auto"))
    recipe.validate()
    with pytest.raises(ValueError, match="features.precision"):
        dataclasses.replace(recipe, features=FeatureSettings(precision="half")).validate()


def test_bf16_inputs_are_recorded_as_fp32_rows_of_the_same_values():
    """A bf16 feature run's layer inputs: the recorder keeps fp32 rows, the same ones and values as when the
    whole input is converted first (it converts only the rows it keeps)."""
    from loraclr.features.hooks import RowRecorder

    x = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    half, full = RowRecorder(cap=20, expected_calls=2, seed=3), RowRecorder(cap=20, expected_calls=2, seed=3)
    for _ in range(2):
        half.add(x.reshape(-1, 8))
        full.add(x.reshape(-1, 8).float())
    assert half.rows().dtype == torch.float32 and torch.equal(half.rows(), full.rows())
