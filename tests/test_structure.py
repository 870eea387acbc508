"""Structure conditioning: ControlNet / T2I-Adapter folders on tiny SD1 and SDXL pipelines, the layout image,
and the world's layout adapter and its training script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter

from loraclr.structure import (
    LAYOUT_DIR,
    Structure,
    check_compatible,
    layout_image,
    load_structure,
    structure_kwargs,
    structure_pipeline,
    unet_adapter_slots,
)
from loraclr.surgery.tokens import encode

HALVES = [(0.0, 0.25, 0.5, 1.0), (0.5, 0.25, 1.0, 1.0)]


def _side(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _draw(pipe, structure=None, image=None, prompt="a red creature"):
    """Final latents of two steps, called as generate() calls the pipeline: prompt embeddings, a negative
    prompt, guidance, size. Latents, not images: the adapter pipelines decode through an older code path
    whose float rounding differs from the base pipeline's by ~1e-7."""
    side = _side(pipe)
    states, pooled = encode(pipe, [prompt], pad=True)
    kw = dict(prompt_embeds=states, negative_prompt="", guidance_scale=5.0, num_inference_steps=2, height=side,
              width=side, generator=torch.Generator().manual_seed(0), output_type="latent")
    if pooled is not None:
        kw["pooled_prompt_embeds"] = pooled
    runner = pipe
    if structure is not None:
        runner = structure_pipeline(pipe, structure)
        kw.update(structure_kwargs(structure, image, side, side))
    return runner(**kw).images[0].numpy()


def _adapter(pipe, adapter_type="full_adapter", channels=None, seed=1) -> T2IAdapter:
    torch.manual_seed(seed)
    # full_adapter: level i at 1 / (d 2^i), as SD1's blocks; full_adapter_xl: its first two levels at 1 / d,
    # where SDXL's first block (no cross-attention) adds after its downsampler: d = 2 x the VAE's factor
    d = pipe.vae_scale_factor * (1 if adapter_type == "full_adapter" else 2)
    return T2IAdapter(in_channels=3, channels=channels or list(pipe.unet.config.block_out_channels),
                      num_res_blocks=1, downscale_factor=d, adapter_type=adapter_type)


def _controlnet(pipe, embedding=None, seed=1) -> ControlNetModel:
    """A ControlNet from the UNet with its zero convolutions made non-zero, so that it steers."""
    n = int(np.log2(pipe.vae_scale_factor)) + 1
    cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=embedding or (8, 16, 16, 16)[:n])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return cn


def _save(model, folder) -> str:
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


# --- the layout image ------------------------------------------------------------------------------------


def test_layout_image_draws_each_box_and_keeps_touching_boxes_apart():
    im = np.asarray(layout_image(HALVES, 64, 64))
    assert im.shape == (64, 64, 3)
    fill, edge, dots = im[..., 0], im[..., 1], im[..., 2]
    assert (fill[16:, :] == 255).all() and (fill[:16, :] == 0).all()  # boxes below the top quarter
    # the two boxes meet at x = 32: each draws its 2 px outline there, so the line between them shows
    assert (edge[20:60, 30:34] == 255).all() and (edge[30, 8:24] == 0).all() and (edge[30, 40:56] == 0).all()
    # one disc per box, at its centre (16, 40) and (48, 40), none between them
    assert dots[40, 16] == 255 and dots[40, 48] == 255 and dots[40, 32] == 0 and dots[10, 16] == 0
    # overlapping boxes: the second box's outline still crosses the first box's inside
    im2 = np.asarray(layout_image([(0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0)], 64, 64))
    assert im2[32, 26, 1] == 255 and im2[32, 37, 1] == 255 and im2[32, 31, 1] == 0


def test_layout_image_scales_with_size_and_rejects_bad_boxes():
    a = np.asarray(layout_image(HALVES, 64, 64)).astype(float)
    b = np.asarray(layout_image(HALVES, 128, 256).resize((64, 64))).astype(float)
    assert np.abs(a[..., 0] - b[..., 0]).mean() < 10  # the same boxes at another size and aspect
    assert np.asarray(layout_image([], 32, 32)).max() == 0
    for bad in [(0.5, 0.0, 0.5, 1.0), (0.0, 0.0, 1.2, 1.0), (0.0, 0.0, 1.0), (0.0, float("nan"), 1.0, 1.0)]:
        with pytest.raises(ValueError, match="layout box 0"):
            layout_image([bad], 64, 64)


# --- loading ----------------------------------------------------------------------------------------------


def test_load_structure_detects_the_kind(tmp_path, tiny_sd1):
    a = load_structure(_save(_adapter(tiny_sd1), tmp_path / "adapter"), scale=0.7)
    c = load_structure(_save(_controlnet(tiny_sd1), tmp_path / "cn"), dtype=torch.float16)
    assert (a.kind, a.scale, a.source) == ("t2i-adapter", 0.7, str(tmp_path / "adapter"))
    assert isinstance(a.model, T2IAdapter) and not a.model.training
    assert c.kind == "controlnet" and isinstance(c.model, ControlNetModel)
    assert next(c.model.parameters()).dtype == torch.float16


def test_load_structure_errors_name_the_folder(tmp_path, tiny_sd1):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_structure(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_structure(tmp_path / "empty")
    unet_dir = _save(tiny_sd1.unet, tmp_path / "unet")
    with pytest.raises(ValueError, match=r"unet: config.json's _class_name is 'UNet2DConditionModel'"):
        load_structure(unet_dir)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    with pytest.raises(FileNotFoundError, match="noweights: cannot load the T2IAdapter weights"):
        load_structure(tmp_path / "noweights")
    bad = _adapter(tiny_sd1)
    with torch.no_grad():
        next(bad.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="nan: non-finite weights"):
        load_structure(_save(bad, tmp_path / "nan"))


# --- fitting a pipeline ------------------------------------------------------------------------------------


def test_unet_adapter_slots_follow_the_unet(tiny_sd1, tiny_sdxl):
    # SD1: both blocks have cross-attention, so the feature goes in before the first block's downsampler
    assert unet_adapter_slots(tiny_sd1.unet, 8) == [(16, 8), (32, 4)]
    # SDXL: the first block has none, so its feature goes in after its downsampler
    assert unet_adapter_slots(tiny_sdxl.unet, 8) == [(16, 4), (32, 4)]


def test_incompatible_models_are_refused_with_the_folder_named(tmp_path, tiny_sd1, tiny_sdxl):
    wide = load_structure(_save(_adapter(tiny_sd1, channels=[32, 64]), tmp_path / "wide-adapter"))
    with pytest.raises(ValueError, match=r"wide-adapter: T2I-Adapter features .* do not fit"):
        check_compatible(tiny_sd1, wide)
    with pytest.raises(ValueError, match="wide-adapter"):
        structure_pipeline(tiny_sd1, wide)  # refuses before building anything
    xl = load_structure(_save(_adapter(tiny_sdxl, "full_adapter_xl"), tmp_path / "xl-adapter"))
    with pytest.raises(ValueError, match="xl-adapter: .*'full_adapter_xl' is for SDXL, the pipeline is SD 1"):
        check_compatible(tiny_sd1, xl)
    # SD's default condition embedding downsamples 8x; the tiny VAE only 2x
    coarse = load_structure(_save(_controlnet(tiny_sd1, embedding=(8, 8, 8, 8)), tmp_path / "coarse-cn"))
    with pytest.raises(ValueError, match="coarse-cn: ControlNet does not fit .* downsamples by 8, the VAE by 2"):
        check_compatible(tiny_sd1, coarse)
    sd1_cn = load_structure(_save(_controlnet(tiny_sd1), tmp_path / "sd1-cn"))
    with pytest.raises(ValueError, match="sd1-cn: a SD 1.x/2.x ControlNet cannot steer a SDXL UNet"):
        check_compatible(tiny_sdxl, sd1_cn)
    half = load_structure(str(tmp_path / "sd1-cn"), dtype=torch.float16)
    with pytest.raises(ValueError, match="sd1-cn: .*dtype=torch.float32"):
        check_compatible(tiny_sd1, half)


def test_structure_pipeline_shares_the_modules(tmp_path, tiny_sd1, tiny_sdxl):
    s = load_structure(_save(_adapter(tiny_sd1), tmp_path / "a"))
    runner = structure_pipeline(tiny_sd1, s)
    assert type(runner).__name__ == "StableDiffusionAdapterPipeline"
    assert runner.unet is tiny_sd1.unet and runner.vae is tiny_sd1.vae and runner.adapter is s.model
    assert runner.text_encoder is tiny_sd1.text_encoder and runner.scheduler is tiny_sd1.scheduler
    assert runner._progress_bar_config == getattr(tiny_sd1, "_progress_bar_config", {"disable": True})
    xl = load_structure(_save(_controlnet(tiny_sdxl), tmp_path / "xl"))
    runner = structure_pipeline(tiny_sdxl, xl)
    assert type(runner).__name__ == "StableDiffusionXLControlNetPipeline"
    assert runner.text_encoder_2 is tiny_sdxl.text_encoder_2 and runner.controlnet is xl.model


def test_structure_kwargs():
    s = Structure("t2i-adapter", T2IAdapter(in_channels=1, channels=[16, 32], num_res_blocks=1, downscale_factor=2),
                  0.5, "x")
    kw = structure_kwargs(s, layout_image(HALVES, 64, 64), 32, 48)
    assert kw["adapter_conditioning_scale"] == 0.5 and kw["image"].size == (48, 32) and kw["image"].mode == "L"
    with pytest.raises(ValueError, match="PIL image"):
        structure_kwargs(s, np.zeros((8, 8, 3)), 8, 8)


# --- drawing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,make", [("sd1", "adapter"), ("sd1", "controlnet"), ("sdxl", "adapter"),
                                         ("sdxl", "controlnet")])
def test_the_condition_steers_and_scale_zero_is_the_base(tmp_path, tiny_sd1, tiny_sdxl, family, make):
    pipe = tiny_sd1 if family == "sd1" else tiny_sdxl
    model = (_adapter(pipe, "full_adapter" if family == "sd1" else "full_adapter_xl") if make == "adapter"
             else _controlnet(pipe))
    folder = _save(model, tmp_path / make)
    side = _side(pipe)
    plain = _draw(pipe)
    left = _draw(pipe, load_structure(folder), layout_image(HALVES[:1], side, side))
    right = _draw(pipe, load_structure(folder), layout_image(HALVES[1:], side, side))
    off = _draw(pipe, load_structure(folder, scale=0.0), layout_image(HALVES[:1], side, side))
    assert left.shape == plain.shape == (4, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
    assert np.abs(left - plain).max() > 1e-3 and np.abs(left - right).max() > 1e-3  # the condition matters
    # scale 0 multiplies every residual by 0: the UNet adds exact zeros
    np.testing.assert_array_equal(off, plain)


# --- the world's layout adapter -----------------------------------------------------------------------------


def test_shipped_layout_adapter_fits_the_mini_base():
    from loraclr.world.model import load_base_pipeline

    weights = LAYOUT_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 0.65e6  # the package's asset budget
    assert "_name_or_path" not in json.loads((LAYOUT_DIR / "config.json").read_text())  # no machine's path
    s = load_structure("layout")
    assert s.kind == "t2i-adapter" and s.source == str(LAYOUT_DIR)
    pipe = load_base_pipeline()
    check_compatible(pipe, s)
    feats = s.model(torch.from_numpy(np.asarray(layout_image(HALVES, 64, 64), dtype=np.float32) / 255)
                    .permute(2, 0, 1)[None])
    # trained away from the zero start; a light adapter's last level is below the UNet's deepest block and
    # unused (diffusers adds it to the mid block only when the shapes match), so it stays at zero
    used = feats[: len(pipe.unet.down_blocks)]
    assert [(f.shape[1], f.shape[-1]) for f in used] == unet_adapter_slots(pipe.unet, 64 // pipe.vae_scale_factor)
    assert all(torch.isfinite(f).all() and f.abs().max() > 0 for f in used)


def test_training_pieces(script, tmp_path):
    from loraclr.world import scenes as S
    from loraclr.world.model import build_text_and_unet, build_vae

    mod = script("scripts/train_layout_adapter.py", "train_layout_adapter")
    rng = np.random.default_rng(0)
    # a loose box holds the tight one and stays within its slot's share of the image
    for _ in range(200):
        x0, x1 = sorted(rng.integers(0, 33, 2))
        tight = (int(x0), 20, int(x1) + 1, 50)
        box = mod.loose_box(tight, 2, "left", rng)
        assert 0.0 <= box[0] <= tight[0] / 64 and tight[2] / 64 <= box[2] <= max(0.5, tight[2] / 64)
        assert 0.0 <= box[1] <= 20 / 64 and 50 / 64 <= box[3] <= 1.0
    vae = build_vae("tiny").eval()
    pool = mod.build_pool(6, 0, vae)
    x0, captions, cond = mod.make_batch(pool, rng, 16)
    assert x0.shape == (16, 4, 16, 16) and cond.shape == (16, 3, 64, 64) and len(captions) == 16
    assert 0.0 <= cond.min() and cond.max() == 1.0
    assert {"", *(r.caption for r in pool["rendered"])} & set(captions)
    scene = S.Scene((S.Character(S.Identity("round", "red"), "left"), S.Character(S.Identity("tall", "blue"), "right")),
                    "beach")
    assert mod.one_character_caption(scene, 1) == "a tall blue creature with two eyes at the beach"
    # the adapter starts at exactly zero features (the base model unchanged) and round-trips through fp16
    _, unet = build_text_and_unet("tiny")
    adapter = mod.build_adapter(unet, 4, 1, seed=0)
    assert all((f == 0).all() for f in adapter(cond[:2]))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01)
    mod.save_adapter(adapter, tmp_path / "layout", {"steps": 0})
    s = load_structure(tmp_path / "layout")
    assert json.loads((tmp_path / "layout" / "training.json").read_text())["steps"] == 0
    ref = adapter.half().float()
    for a, b in zip(s.model.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
