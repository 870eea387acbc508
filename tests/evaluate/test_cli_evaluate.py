"""``loraclr evaluate`` end to end on a tiny random pipeline, with a tiny random CLIPModel folder (--clip)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from loraclr.cli import main
from loraclr.world.tokenizer import TOKENIZER_DIR


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=8)
    cfg = CLIPConfig(text_config=dict(common, vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(common, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(folder))
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from loraclr.world.model import build_text_and_unet, build_vae, save_pipeline_folder

    folder = tmp_path_factory.mktemp("tiny") / "pipe"
    te, unet = build_text_and_unet("tiny", seed=0)
    save_pipeline_folder(build_vae("tiny", seed=0), te, unet, folder, dtype=torch.float32)
    return folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "manifest.json"
    path.write_text(json.dumps({"base": "mini", "concepts": [
        {"name": n, "kind": "identity", "identity": n, "style": None, "trigger": f"zq{n}", "file": "x",
         "format": "kohya"} for n in ("rubo", "tavi")]}))
    return path


def test_hf_clip_embeddings_are_unit_and_deterministic(tiny_clip):
    from loraclr.evaluate.external import HFClip

    clip = HFClip(tiny_clip)
    img = torch.rand(3, 3, 64, 48)  # not square, not the model's size: resized and centre-cropped
    a = clip.embed_images(img)
    t = clip.embed_texts(["a round red creature at the beach", "a tall blue creature"])
    assert a.shape == (3, 8) and t.shape == (2, 8)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(clip.embed_texts(["a tall blue creature"])[0], t[1], atol=1e-5)  # padding-free
    assert not torch.allclose(t[0], t[1])


def test_cli_evaluate_with_clip_folder(tiny_model, tiny_clip, manifest, tmp_path):
    out = tmp_path / "res.json"
    md = tmp_path / "res.md"
    rc = main(["-q", "evaluate", str(tiny_model), "--manifest", str(manifest), "--suite", "all", "--prompts", "1",
               "--seeds", "2", "--pairs", "1", "--triples", "0", "--steps", "2", "--clip", str(tiny_clip),
               "--json", str(out), "--md", str(md)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert [r["suite"] for r in res] == ["single", "multi"]
    single = res[0]
    assert single["evaluators"]["text_image"] == f"clip:{tiny_clip.name}"
    assert single["overall"]["text"]["n"] == 2 * 2  # 2 concepts x 1 prompt x 2 seeds
    assert single["images"][0]["prompt"] == "a zqrubo creature at the beach"
    assert single["images"][0]["scored_text"].startswith("a round red creature")
    assert -1.0 <= single["overall"]["text"]["mean"] <= 1.0
    assert len(res[1]["images"]) == 2 and "| rubo |" in md.read_text()


def test_cli_evaluate_user_errors(tiny_model, manifest, capsys):
    assert main(["evaluate", str(tiny_model), "--manifest", str(manifest), "--concepts", "nobody"]) == 2
    assert "unknown concepts ['nobody']" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model), "--manifest", str(manifest), "--seeds", "0"]) == 2


def test_cli_evaluate_own_edlora_needs_allow_pickle(tiny_model, tiny_clip, tmp_path, capsys):
    """ED-LoRA concepts are .pth files: refused (naming the file) without --allow-pickle, scored with it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from loraclr.lora import LearnedToken, LoraLayer
    from loraclr.surgery.hooks import cross_attention_modules
    from loraclr.training.save import save_edlora

    h = CLIPTextModel.from_pretrained(str(tiny_model / "text_encoder")).config.hidden_size
    n_layers = len(cross_attention_modules(UNet2DConditionModel.from_pretrained(str(tiny_model / "unet"))))
    g = torch.Generator().manual_seed(0)
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    pth = tmp_path / "ed.pth"
    save_edlora({key: LoraLayer(torch.randn(2, h, generator=g), torch.randn(h, 2, generator=g), 2.0)},
                [LearnedToken("<ed1>", {"text_encoder": torch.randn(n_layers, h, generator=g)}, layerwise=True)], pth)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base": "mini", "concepts": [
        {"name": "rubo", "kind": "identity", "identity": "rubo", "style": None, "trigger": "<ed1>",
         "file": str(pth), "format": "edlora"}]}))
    args = ["-q", "evaluate", str(tiny_model), "--own-loras", "--manifest", str(manifest), "--suite", "single",
            "--prompts", "1", "--seeds", "1", "--steps", "2", "--clip", str(tiny_clip)]
    assert main(args) == 2
    assert "ed.pth" in capsys.readouterr().err
    out = tmp_path / "res.json"
    assert main(args + ["--allow-pickle", "--json", str(out)]) == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["overall"]["text"]["n"] == 1


def test_cli_evaluate_regions_and_the_per_region_reference(tiny_model, tiny_clip, tmp_path, capsys):
    """--regions draws the multi suite with each character in its scoring box; --own-loras --suite multi
    --region-mode noise draws each region with its own concept's LoRA alone."""
    from loraclr.io import save_lora
    from loraclr.pipeline import load_base

    pipe = load_base(str(tiny_model))
    sys.path.insert(0, str(Path(__file__).parents[1] / "features"))
    from lora_factory import random_loraset

    concepts = []
    for i, n in enumerate(("rubo", "tavi")):
        f = tmp_path / f"{n}.safetensors"
        save_lora(random_loraset(pipe, seed=i, scale=0.2).layers, f, format="kohya", family="sd1")
        concepts.append({"name": n, "kind": "identity", "identity": n, "style": None, "trigger": f"zq{n}",
                         "file": str(f), "format": "kohya"})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base": "mini", "concepts": concepts}))
    common = ["-q", "evaluate", str(tiny_model), "--manifest", str(manifest), "--suite", "multi", "--pairs", "1",
              "--triples", "0", "--seeds", "1", "--steps", "2", "--clip", str(tiny_clip)]
    for extra in (["--region-mode", "attention", "--region-start", "0.5"], ["--own-loras", "--region-mode", "noise"]):
        out = tmp_path / "res.json"
        assert main([*common, *extra, "--json", str(out)]) == 0
        (res,) = json.loads(out.read_text())["results"]
        assert res["settings"]["regions"] == extra[extra.index("--region-mode") + 1]
        assert len(res["images"]) == 1 and "leakage" in res["overall"]
    assert main([*common, "--own-loras"]) == 2
    assert "needs --region-mode noise" in capsys.readouterr().err
    assert main([*common, "--own-loras", "--region-mode", "attention"]) == 2
    assert main([*common[:-8], "--suite", "single", "--region-mode", "noise"]) == 2
    assert "applies to the multi suite" in capsys.readouterr().err
    assert main([*common, "--structure", "layout"]) == 2
    assert "--structure need --region-mode" in capsys.readouterr().err
