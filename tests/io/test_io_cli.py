"""``loraclr inspect`` and ``loraclr convert`` through cli.main."""

from __future__ import annotations

import json

import torch

from loraclr.cli import main
from loraclr.io import load_lora, save_lora
from loraclr.lora import LoraLayer

KEYS = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (2048, 640),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280),
}


def _sdxl_file(tmp_path):
    layers = {k: LoraLayer(torch.randn(4, i), torch.randn(o, 4), 2.0) for k, (i, o) in KEYS.items()}
    path = tmp_path / "xl.safetensors"
    save_lora(layers, path, format="kohya", family="sdxl",
              metadata={"ss_tag_frequency": json.dumps({"img": {"sks dog": 10, "grass": 3}}),
                        "modelspec.trigger_phrase": "sks"})
    return path, layers


def test_inspect_json(tmp_path, capsys):
    path, _ = _sdxl_file(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["family"] == "sdxl"
    assert info["components"] == {"text_encoder_2": 1, "unet": 2}
    assert info["blocks"]["unet.down_blocks.1"] == {"modules": 1, "rank": [4], "alpha": [2.0], "dense": 0}
    assert info["trigger_words"][:3] == ["sks", "sks dog", "grass"]
    assert info["dtype"] == ["float32"] and info["warnings"] == []


def test_inspect_text_and_warnings(tmp_path, capsys):
    path, _ = _sdxl_file(tmp_path)
    assert main(["inspect", str(path), "--modules"]) == 0
    out = capsys.readouterr().out
    assert "format:   kohya" in out and "family:   sdxl" in out and "unet.mid_block" in out
    assert all(f"  {k}\n" in out for k in KEYS)
    # a file with a nonsense module: inspect lists it as a warning instead of failing
    from safetensors.torch import save_file

    save_file({"lora_unet_nowhere_layer.lora_down.weight": torch.randn(2, 4),
               "lora_unet_nowhere_layer.lora_up.weight": torch.randn(4, 2),
               "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, 4),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(4, 2)},
              str(tmp_path / "odd.safetensors"))
    assert main(["inspect", str(tmp_path / "odd.safetensors")]) == 0
    assert "warning: unknown keys" in capsys.readouterr().out


def test_convert_round_trip_and_errors(tmp_path, capsys):
    path, layers = _sdxl_file(tmp_path)
    out = tmp_path / "d.safetensors"
    assert main(["convert", str(path), str(out), "--to", "diffusers"]) == 0
    back = load_lora(out)
    assert back.format == "diffusers" and back.family == "sdxl"
    for k, layer in layers.items():
        assert torch.equal(back.layers[k].delta(), layer.delta())
    # wrong family and overwrite-the-input are one-line errors
    assert main(["convert", str(path), str(tmp_path / "x.safetensors"), "--to", "kohya", "--family", "sd1"]) == 2
    assert "not a sd1 LoRA" in capsys.readouterr().err
    assert main(["convert", str(path), str(path), "--to", "kohya"]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_reports_nan_as_a_warning(tmp_path, capsys):
    from safetensors.torch import save_file

    down = torch.randn(2, 768)
    down[0, 0] = float("nan")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.randn(320, 2)},
              str(tmp_path / "nan.safetensors"))
    assert main(["inspect", str(tmp_path / "nan.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert any(f"non-finite values in {name}.lora_down.weight (1 NaN" in w for w in info["warnings"])


def test_convert_edlora_to_kohya_keeps_tokens(tmp_path, capsys):
    un = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    emb = torch.randn(16, 768)
    torch.save({"params": {"new_concept_embedding": {"<c1>": emb},
                           "unet": {f"{un}.lora_down.weight": torch.randn(4, 768),
                                    f"{un}.lora_up.weight": torch.randn(320, 4)}}}, tmp_path / "c.pth")
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(tmp_path / "c.pth"), str(out), "--to", "kohya"]) == 2
    assert "pickle" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(tmp_path / "c.pth"), str(out), "--to", "kohya", "--allow-pickle"]) == 0
    back = load_lora(out)
    assert back.family == "sd1" and back.tokens[0].name == "<c1>" and back.tokens[0].layerwise
    assert torch.equal(back.tokens[0].embeddings["text_encoder"], emb)
    assert main(["inspect", str(out)]) == 0
    assert "learned token: <c1>" in capsys.readouterr().out
