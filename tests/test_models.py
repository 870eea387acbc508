import pytest

from loraclr.models import default_lora_targets, find_module


@pytest.mark.parametrize(("fixture", "n_unet", "n_te"), [("meta_sd15", 192, 72), ("meta_sdxl", 722, 264)])
def test_default_kohya_targets_match_real_module_counts(request, fixture, n_unet, n_te):
    targets = default_lora_targets(request.getfixturevalue(fixture))
    assert sum(k.startswith("unet.") for k in targets) == n_unet
    assert sum(k.startswith("text_encoder") for k in targets) == n_te


def test_find_module_accepts_text_model_prefix(tiny_sd1):
    with_prefix = find_module(tiny_sd1, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
    without = find_module(tiny_sd1, "text_encoder.encoder.layers.0.self_attn.q_proj")
    assert with_prefix is without


def test_find_module_names_missing_key(tiny_sd1):
    with pytest.raises(KeyError, match="unet.down_blocks.9"):
        find_module(tiny_sd1, "unet.down_blocks.9.attentions.0.proj_in")
