"""kohya names <-> canonical keys for every default module of real-shaped SD 1.5 and SDXL key sets."""

from __future__ import annotations

import torch

from loraclr.io import keymap
from loraclr.models import default_lora_targets


def _counts(keys):
    unet = sum(k.startswith("unet.") for k in keys)
    return unet, len(keys) - unet


def test_sd15_all_192_72_kohya_names_round_trip(meta_sd15):
    targets = default_lora_targets(meta_sd15)
    assert _counts(targets) == (192, 72)
    for key in targets:
        name = keymap.kohya_name(key, "sd1")
        # SD1 kohya names are the diffusers path with '_' (independent spelling of the rule)
        comp, path = key.split(".", 1)
        assert name == {"unet": "lora_unet_", "text_encoder": "lora_te_"}[comp] + path.replace(".", "_")
        assert keymap.canonical_from_kohya(name) == key


def test_sdxl_all_722_264_kohya_names_round_trip(meta_sdxl):
    targets = default_lora_targets(meta_sdxl)
    assert _counts(targets) == (722, 264)
    names = {keymap.kohya_name(k, "sdxl"): k for k in targets}
    assert len(names) == 986
    assert all(n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                             "lora_te1_", "lora_te2_")) for n in names)
    for name, key in names.items():
        assert keymap.canonical_from_kohya(name) == key
        # the hybrid "diffusers names with kohya prefixes" resolves to the same module
        comp, path = key.split(".", 1)
        if comp == "unet":
            assert keymap.canonical_from_kohya("lora_unet_" + path.replace(".", "_")) == key


def test_sdxl_sgm_golden_names():
    # hand-derived from the SGM layout (peers.md F.1): input_blocks 4 = down block 1, first attention, etc.
    golden = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_input_blocks_8_1_proj_in": "unet.down_blocks.2.attentions.1.proj_in",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": "unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0":
            "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "lora_unet_output_blocks_5_1_proj_out": "unet.up_blocks.1.attentions.2.proj_out",
        "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
        "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
        "lora_unet_middle_block_2_out_layers_3": "unet.mid_block.resnets.1.conv2",
        "lora_unet_input_blocks_0_0": "unet.conv_in",
        "lora_unet_out_2": "unet.conv_out",
        "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
        "lora_unet_label_emb_0_2": "unet.add_embedding.linear_2",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": "text_encoder_2.text_model.encoder.layers.31.mlp.fc1",
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
    }
    for name, key in golden.items():
        assert keymap.canonical_from_kohya(name) == key, name


def test_sgm_map_agrees_with_diffusers_kohya_converter(meta_sdxl):
    """diffusers' own kohya converter (given the UNet config) is the independent judge of the SGM map."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    targets = default_lora_targets(meta_sdxl)
    sd, want = {}, {}
    for key in targets:
        if not key.startswith("unet."):
            continue
        name = keymap.kohya_name(key, "sdxl")
        sd[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        sd[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
        want[key] = name
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), meta_sdxl["unet"].config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    peft = convert_unet_state_dict_to_peft(converted)
    got = {k.rsplit(".lora_A.weight", 1)[0] for k in peft if k.endswith("lora_A.weight")}
    assert got == set(want)


def test_full_ldm_map_covers_every_unet_parameter(meta_sdxl):
    to_ldm, from_ldm = keymap.ldm_maps(keymap.real_unet_config("sdxl"))
    modules = {n.rpartition(".")[0] for n, _ in meta_sdxl["unet"].named_parameters()}
    assert modules == set(to_ldm)
    assert len(from_ldm) == len(to_ldm)
