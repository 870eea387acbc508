"""The mini SD pipeline folder: written atomically in fp16, loaded and sampled by stock diffusers.

The folder-building code is tested on a tiny untrained model (always runs); the built-in trained folder is
tested when it has been built.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from loraclr.world import model as M
from loraclr.world import training as T


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = M.build_vae("tiny", seed=0)
    te, unet = M.build_text_and_unet("tiny", seed=0)
    folder = tmp_path_factory.mktemp("world") / "mini-sd"
    M.save_pipeline_folder(vae, te, unet, folder, state={"step": 3, "seed": 0})
    return folder, (vae, te, unet)


def test_folder_layout_and_fp16(tiny_folder):
    folder, (vae, te, unet) = tiny_folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
        # SD-shaped module names, so LoRAs on it look like LoRAs on SD
        assert any(".attn2.to_k.weight" in k for k in keys) and any(".ff.net.2.weight" in k for k in keys)
        k = "down_blocks.0.attentions.0.proj_in.weight"
        ref = unet.state_dict()[k]
        torch.testing.assert_close(f.get_tensor(k).float(), ref.half().float())
    assert M.read_training_state(folder) == {"step": 3, "seed": 0}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_saving_again_replaces_the_folder(tiny_folder, tmp_path):
    _, (vae, te, unet) = tiny_folder
    folder = tmp_path / "sd"
    M.save_pipeline_folder(vae, te, unet, folder, state={"step": 1})
    M.save_pipeline_folder(vae, te, unet, folder, state={"step": 2})
    assert M.read_training_state(folder)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["sd"]


def test_stock_diffusers_loads_and_samples(tiny_folder):
    from diffusers import StableDiffusionPipeline

    folder, (vae, te, unet) = tiny_folder
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a round red creature with two eyes at the beach", num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert pipe.tokenizer("a photo of sks man").input_ids == [49406, 320, 1125, 539, 48136, 786, 49407]
    # the loaded weights are the fp16-rounded originals
    torch.testing.assert_close(pipe.unet.conv_in.weight, unet.conv_in.weight.half().float())


def test_load_base_pipeline_from_a_given_folder(tiny_folder):
    folder, _ = tiny_folder
    pipe = M.load_base_pipeline(path=folder)
    assert pipe.unet.dtype == torch.float32 and pipe.vae_scale_factor == 4


def test_missing_base_model_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "BASE_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not built yet: .*run"):
        M.base_model_path()


def test_train_base_few_steps_writes_and_resumes(tmp_path):
    vae = M.build_vae("tiny", seed=0)
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(str(tmp_path / "vae"))
    kw = dict(vae_dir=tmp_path / "vae", data_path=tmp_path / "data.pt", folder=tmp_path / "sd",
              runs_dir=tmp_path / "runs", size="tiny", n=16, batch=4, total_steps=50, log_every=1,
              grid_kwargs=dict(scenes=T.SAMPLE_SCENES[:1], per_prompt=1, steps=2))
    losses = []
    st = T.train_base(max_steps=3, callback=lambda s, loss: losses.append(loss), **kw)
    assert st["step"] == 3 and len(losses) == 3 and all(np.isfinite(losses))
    assert (tmp_path / "runs" / "samples" / "step-000003.png").exists()
    data = torch.load(tmp_path / "data.pt", weights_only=False)
    assert data["latents"].shape == (16, 4, 16, 16) and data["input_ids"].shape == (16, 77)
    # resume from the folder alone (a fresh machine: no full checkpoint)
    (tmp_path / "runs" / "base-last.pt").unlink()
    st = T.train_base(max_steps=2, **kw)
    assert st["step"] == 5 and st["history"] == [{"resumed_at": 3}]


@pytest.mark.skipif(not (M.BASE_MODEL_DIR / "model_index.json").exists(),
                    reason="the trained mini-sd folder is not built yet (python scripts/train_world.py all)")
def test_built_in_base_model():
    from diffusers import StableDiffusionPipeline

    folder = M.base_model_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 40e6
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    out = pipe("a round red creature with two eyes at the beach", num_inference_steps=25,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # 4.9 s measured with 1 thread at load average ~8 on 2 cores; the bound only catches gross regressions
    assert time.time() - t < 30.0
    state = M.read_training_state(folder)
    assert state["step"] > 0


def test_streamed_batches_depend_only_on_seed_and_step(tmp_path):
    from loraclr.world.tokenizer import load_tokenizer

    vae = M.build_vae("tiny", seed=0).eval()
    tok = load_tokenizer()
    a = T._stream_batch(vae, tok, seed=0, step=5, batch=3, autocast=False)
    b = T._stream_batch(vae, tok, seed=0, step=5, batch=3, autocast=False)
    c = T._stream_batch(vae, tok, seed=0, step=6, batch=3, autocast=False)
    assert a[0].shape == (3, 4, 16, 16) and a[1].shape == (3, 77)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(str(tmp_path / "vae"))
    st = T.train_base(vae_dir=tmp_path / "vae", data_path=None, folder=tmp_path / "sd", runs_dir=tmp_path / "r",
                      size="tiny", batch=2, total_steps=10, max_steps=2, grid_kwargs=dict(
                          scenes=T.SAMPLE_SCENES[:1], per_prompt=1, steps=1))
    assert st["step"] == 2 and st["data"]["n"] == "stream"


def test_shipped_world_fits_its_40_mb_budget():
    """Issue 4: everything shipped (base, tokenizer, evaluators, concept LoRAs) is at most 40 MB, with one
    tokenizer copy (the built-in pipeline's)."""
    from loraclr.world.tokenizer import ASSETS, TOKENIZER_DIR

    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 40e6, f"{total / 1e6:.1f} MB shipped under {ASSETS}"
    vocabs = [p for p in files if p.name == "vocab.json"]
    assert vocabs == [TOKENIZER_DIR / "vocab.json"], vocabs


def test_scene_pools_are_the_same_for_any_number_of_workers():
    one = T.render_pool("base", 1200, seed=3, workers=1)  # two chunks: 1000 + 200
    two = T.render_pool("base", 1200, seed=3, workers=2)
    assert one[0].shape == (1200, 64, 64, 3) and one[2].shape == (1200, 77)
    assert np.array_equal(one[0], two[0]) and one[1] == two[1] and np.array_equal(one[2], two[2])
    # token ids are the captions' (first and last scene)
    from loraclr.world.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for i in (0, 1199):
        assert torch.equal(torch.from_numpy(one[2][i]).long(), T.tokenize(tok, [one[1][i]])[0])
    vae = T.render_pool("vae", 30, seed=3)[0]
    assert vae.shape == (30, 64, 64, 3) and not np.array_equal(vae, one[0][:30])
    with pytest.raises(ValueError, match="pool kind"):
        T.pool_jobs("faces", 10)


def test_fit_minutes_cuts_the_schedule_and_records_how(tmp_path):
    vae = M.build_vae("tiny", seed=0)
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(str(tmp_path / "vae"))
    st = T.train_base(vae_dir=tmp_path / "vae", data_path=tmp_path / "pool.pt", folder=tmp_path / "sd",
                      runs_dir=tmp_path / "r", size="tiny", n=40, batch=2, total_steps=10**6, workers=1,
                      fit_minutes=0.001, grid_kwargs=dict(scenes=T.SAMPLE_SCENES[:1], per_prompt=1, steps=1))
    # the time is spent by the 50 timed steps, so the schedule ends right after them
    assert st["step"] == st["total_steps"] == 51 and "fitted to 0.001 min on cpu" in st["total_steps_how"]
    assert torch.load(tmp_path / "pool.pt", weights_only=False)["pool"] == "chunks"
