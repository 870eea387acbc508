"""`generate`: base + LoRAs stacked naively (the 'before merging' reference), argument parsing, grids."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "features"))
from lora_factory import random_loraset  # noqa: E402

from loraclr.cli import main  # noqa: E402
from loraclr.io import save_lora  # noqa: E402
from loraclr.pipeline import generate, load_with_loras, make_grid, parse_lora_arg, parse_size  # noqa: E402


def test_parse_arguments():
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)  # a drive letter is no scale
    assert parse_size("512x768") == (512, 768) and parse_size("64") == (64, 64)
    with pytest.raises(ValueError, match="expected HxW"):
        parse_size("big")
    with pytest.raises(ValueError, match="sides >= 8"):
        parse_size("4x4")


def test_grid_layout():
    from PIL import Image

    rows = [[Image.new("RGB", (8, 6), (i * 50, j * 50, 0)) for j in range(3)] for i in range(2)]
    g = make_grid(rows)
    assert g.size == (24, 12)
    assert g.getpixel((17, 7)) == (50, 100, 0)  # row 1, column 2


def test_naive_stacking_is_the_sum_of_deltas(tmp_path, tiny_sd1):
    tiny_sd1.save_pretrained(str(tmp_path / "base"))
    loras = [random_loraset(tiny_sd1, seed=s, scale=0.1) for s in (1, 2)]
    for i, lora in enumerate(loras):
        save_lora(lora.layers, tmp_path / f"l{i}.safetensors", format="kohya", family="sd1")
    model = load_with_loras(str(tmp_path / "base"), [(str(tmp_path / "l0.safetensors"), 0.5),
                                                     (str(tmp_path / "l1.safetensors"), 1.0)])
    for key in ("unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"):
        comp, path = key.split(".", 1)
        path = path.removeprefix("text_model.")
        w0 = dict(getattr(tiny_sd1, comp).named_modules())[path].weight
        w = dict(getattr(model.pipe, comp).named_modules())[path].weight
        expected = w0 + 0.5 * loras[0].layers[key].delta() + loras[1].layers[key].delta()
        torch.testing.assert_close(w, expected.reshape(w.shape), rtol=1e-5, atol=1e-5)
    images = generate(model, ["photo of sks man"], n=2, steps=2, guidance=2.0, out_dir=tmp_path / "img",
                      grid=tmp_path / "grid.png", progress=False)
    assert len(images) == 2 and images[0].size == (16, 16)
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["000-0.png", "000-1.png"]
    # different seeds, different images
    assert not torch.equal(torch.tensor(list(images[0].getdata())), torch.tensor(list(images[1].getdata())))


def test_generate_cli_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "a cat", "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "base model not found" in capsys.readouterr().err
    (tmp_path / "base").mkdir()
    rc = main(["generate", str(tmp_path / "base"), "a cat", "--lora", str(tmp_path / "x.safetensors:0.5"),
               "-o", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "x.safetensors: LoRA file not found" in capsys.readouterr().err
    # more steps than the scheduler's training timesteps: one line before any sampling, not an IndexError
    rc = main(["generate", "mini", "a creature", "--steps", "1001", "-o", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "1001 denoising steps asked; this model's scheduler takes 1 to 1000" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
