"""The concept LoRA trainer on a tiny SD1 pipeline: it learns, it changes outputs, and its files read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loraclr.io import load_lora
from loraclr.lora import LoraLayer
from loraclr.models import build_pipeline
from loraclr.surgery.hooks import apply_layers, cross_attention_modules
from loraclr.training import (
    ConceptData,
    TrainConfig,
    denoising_loss,
    lora_targets,
    pick_trigger,
    save_trained,
    train_lora,
    world_identity_data,
)
from loraclr.training.data import caption_vocabulary_ids, replace_phrase


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    p = build_pipeline("sd1", "tiny", seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _resize(images: np.ndarray, side: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.BICUBIC)) for i in images])


def _init_embedding(pipe) -> torch.Tensor:
    """Where learned tokens start: the mean embedding of the init word ("creature", TrainConfig's default)."""
    return pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("creature").input_ids[1:-1]].mean(0).detach()


@pytest.fixture(scope="module")
def data(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    d = world_identity_data("rubo", "a rubox creature", n=6, seed=0, n_prior=4)
    return ConceptData(_resize(d.images, side), d.captions, _resize(d.prior_images, side), d.prior_captions, "rubo")


@pytest.fixture(scope="module")
def trained(pipe, data):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = TrainConfig(steps=20, batch=6, prior_batch=0, lr=1e-2, text_lr=5e-3, warmup=1, seed=3, autocast=False)
    result = train_lora(pipe, data, cfg, log_every=0)
    return result, before


def test_training_lowers_the_loss_on_fixed_draws(pipe, data, trained):
    result, _ = trained
    base = denoising_loss(pipe, data, n_draws=8)
    after = denoising_loss(pipe, data, result.layers, n_draws=8)
    # measured: 1.130 -> 1.007 after 15 steps, 0.955 after 25 (same draws for both)
    assert after < 0.93 * base, (base, after)


def test_lora_changes_outputs_and_leaves_the_pipeline_alone(pipe, data, trained):
    result, before = trained
    after_sd = pipe.unet.state_dict()
    assert set(after_sd) == set(before)  # no peft modules left in the caller's UNet
    assert all(torch.equal(before[k], after_sd[k]) for k in before)
    assert all(float(layer.up.abs().max()) > 0 for layer in result.layers.values())
    lset = result.lora_set()
    assert lset.components() == ["text_encoder", "unet"] and lset.layers == result.layers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a rubox creature at the beach"] * 2, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        y0 = pipe.unet(x, torch.tensor([500, 500]), states).sample
        with apply_layers(pipe, result.layers):
            states1 = pipe.text_encoder(ids)[0]
            y1 = pipe.unet(x, torch.tensor([500, 500]), states1).sample
    rel = float((y1 - y0).norm() / y0.norm())
    assert rel > 1e-2, rel


def test_targets(pipe):
    attn = lora_targets(pipe, "attn")
    kohya = lora_targets(pipe, "kohya")
    unet_attn = [k for k in attn if k.startswith("unet.")]
    text_attn = [k for k in attn if k.startswith("text_encoder.")]
    # tiny SD1 UNet: 7 transformer blocks x (attn1, attn2) x (q, k, v, out); tiny CLIP: 2 layers x 4
    assert len(unet_attn) == 7 * 2 * 4 and len(text_attn) == 2 * 4
    assert all(k.split(".")[-2] in ("attn1", "attn2") or k.endswith("to_out.0") for k in unet_attn)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_attn)
    assert set(attn) < set(kohya)
    extra = set(kohya) - set(attn)
    assert any(k.endswith("ff.net.2") for k in extra) and any(k.endswith("proj_in") for k in extra)
    assert any(k.endswith("mlp.fc1") for k in extra)
    assert len(lora_targets(pipe, "attn", text_encoder=False)) == len(unet_attn)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_file_reads_back_to_the_same_deltas(tmp_path, trained, fmt):
    result, _ = trained
    path = tmp_path / f"c-{fmt}.safetensors"
    save_trained(result, path, format=fmt, family="sd1", trigger="rubox")
    lora = load_lora(path)
    assert lora.format == fmt and set(lora.layers) == set(result.layers)
    if fmt == "kohya":
        assert lora.metadata["modelspec.trigger_phrase"] == "rubox"
    for key, layer in result.layers.items():
        got = lora.layers[key]
        assert isinstance(got, LoraLayer) and got.alpha == layer.alpha and got.down.dtype == torch.float16
        # the file holds fp16 factors: compare with the same rounding, exactly
        want = LoraLayer(layer.down.half(), layer.up.half(), layer.alpha).delta()
        torch.testing.assert_close(got.delta(), want, rtol=0, atol=0)
        torch.testing.assert_close(got.delta(), layer.delta(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "edlora"])
def test_strength_scales_the_saved_deltas_and_not_the_tokens(tmp_path, trained, fmt):
    result, _ = trained
    path = tmp_path / ("s.pth" if fmt == "edlora" else "s.safetensors")
    save_trained(result, path, format=fmt, family="sd1", strength=0.5)
    lora = load_lora(path, allow_pickle=fmt == "edlora")
    if fmt != "edlora":
        assert lora.metadata["loraclr.strength"] == "0.5"
    for key, layer in result.layers.items():
        torch.testing.assert_close(lora.layers[key].delta(), 0.5 * layer.delta(), rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        save_trained(result, tmp_path / "bad.safetensors", format="kohya", strength=0.0)


def test_edlora_trains_layerwise_tokens_and_reads_back(tmp_path, pipe, data):
    captions = [c.replace("a rubox creature", "a <rubo1> <rubo2> creature") for c in data.captions]
    # with prior images: their rows skip the per-layer expansion and are shared by every layer
    d = ConceptData(data.images, captions, data.prior_images, data.prior_captions, description="rubo edlora")
    cfg = TrainConfig(steps=4, batch=4, prior_batch=2, tokens=("<rubo1>", "<rubo2>"), layerwise=True, seed=1,
                      autocast=False, embedding_lr=1e-2, warmup=1)
    result = train_lora(pipe, d, cfg, log_every=0)
    n_layers = len(cross_attention_modules(pipe.unet))
    dim = pipe.text_encoder.config.hidden_size
    assert [t.name for t in result.tokens] == ["<rubo1>", "<rubo2>"]
    init = _init_embedding(pipe)
    for t in result.tokens:
        emb = t.embeddings["text_encoder"]
        assert t.layerwise and emb.shape == (n_layers, dim)
        assert float((emb - init).abs().max()) > 1e-3  # trained away from the init word, row by row
    path = tmp_path / "rubo.pth"
    save_trained(result, path, format="edlora")
    raw = torch.load(path, weights_only=True)  # plain tensors and dicts only
    assert set(raw["params"]) == {"new_concept_embedding", "text_encoder", "unet"}
    assert any(k.startswith("text_model.encoder.layers.0.self_attn.q_proj.lora_down") for k in raw["params"]["text_encoder"])
    lora = load_lora(path, allow_pickle=True)
    assert lora.format == "edlora"
    assert {t.name: t.layerwise for t in lora.tokens} == {"<rubo1>": True, "<rubo2>": True}
    for t, want in zip(sorted(lora.tokens, key=lambda t: t.name), result.tokens, strict=True):
        torch.testing.assert_close(t.embeddings["text_encoder"], want.embeddings["text_encoder"], rtol=0, atol=0)
    assert set(lora.layers) == set(result.layers)
    for key, layer in result.layers.items():  # alpha / rank folded into up: same delta, fp32
        torch.testing.assert_close(lora.layers[key].delta(), layer.delta(), rtol=1e-6, atol=1e-8)


def test_learned_token_is_saved_beside_a_kohya_lora(tmp_path, pipe, data):
    captions = [c.replace("a rubox creature", "a <rbx> creature") for c in data.captions]
    d = ConceptData(data.images, captions, description="rubo ti")
    result = train_lora(pipe, d, TrainConfig(steps=2, batch=2, tokens=("<rbx>",), autocast=False), log_every=0)
    path = tmp_path / "rbx.safetensors"
    save_trained(result, path, format="kohya", family="sd1", trigger="<rbx>")
    lora = load_lora(path)
    assert [t.name for t in lora.tokens] == ["<rbx>"] and not lora.tokens[0].layerwise
    torch.testing.assert_close(lora.tokens[0].embeddings["text_encoder"].float(),
                               result.tokens[0].embeddings["text_encoder"], rtol=0, atol=0)
    # a baked-in strength scales the LoRA only: the learned token is the trained one
    half = load_lora(save_trained(result, tmp_path / "rbx-half.safetensors", format="kohya", strength=0.5))
    torch.testing.assert_close(half.tokens[0].embeddings["text_encoder"], lora.tokens[0].embeddings["text_encoder"],
                               rtol=0, atol=0)


def test_token_warmup_trains_the_tokens_alone_first(pipe, data):
    captions = [c.replace("a rubox creature", "a <rbx> creature") for c in data.captions]
    d = ConceptData(data.images, captions, description="rubo pivotal")
    lr = 1e-2

    def run(token_warmup: int):
        cfg = TrainConfig(steps=4, batch=2, prior_batch=0, lr=lr, text_lr=lr, embedding_lr=lr, warmup=1,
                          tokens=("<rbx>",), token_warmup=token_warmup, autocast=False, seed=2)
        r = train_lora(pipe, d, cfg, log_every=0)
        return r, max(float(layer.up.abs().max()) for layer in r.layers.values())

    warm, up_warm = run(3)
    plain, up_plain = run(0)
    # ups start at zero and an Adam step moves an entry by at most lr: after 3 token-only steps and 1 joint step
    # no entry can exceed lr, while 4 joint steps go past it
    assert 0 < up_warm <= lr * 1.001, up_warm
    assert up_plain > 1.5 * lr, up_plain
    init = _init_embedding(pipe)
    assert float((warm.tokens[0].embeddings["text_encoder"][0] - init).abs().max()) > 2 * lr  # 4 token steps
    with pytest.raises(ValueError, match="token_warmup"):
        TrainConfig(steps=4, token_warmup=4, tokens=("<rbx>",))
    with pytest.raises(ValueError, match="learned token"):
        TrainConfig(steps=4, token_warmup=2)


def test_snapshot_holds_what_the_shorter_run_trains(pipe, data):
    captions = [c.replace("a rubox creature", "a <rbx> creature") for c in data.captions]
    d = ConceptData(data.images, captions, description="rubo snapshots")

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch=2, prior_batch=0, lr=1e-2, text_lr=1e-2, embedding_lr=1e-2, warmup=1,
                           tokens=("<rbx>",), token_warmup=1, autocast=False, seed=5)

    got = []
    full = train_lora(pipe, d, cfg(5), log_every=0, snapshots=[3, 2], on_snapshot=got.append)
    short = train_lora(pipe, d, cfg(3), log_every=0)
    assert [r.config.steps for r in got] == [2, 3]
    snap = got[1]
    assert snap.losses == short.losses == full.losses[:3]
    for key, layer in short.layers.items():
        assert torch.equal(snap.layers[key].up, layer.up), key
        assert torch.equal(snap.layers[key].down, layer.down), key
    assert torch.equal(snap.tokens[0].embeddings["text_encoder"], short.tokens[0].embeddings["text_encoder"])
    # the snapshot is a copy: the run went on training after it
    assert any(not torch.equal(snap.layers[k].up, full.layers[k].up) for k in full.layers)
    with pytest.raises(ValueError, match="snapshots"):  # a LoRA that has not trained yet is no candidate
        train_lora(pipe, d, cfg(5), log_every=0, snapshots=[1], on_snapshot=got.append)
    with pytest.raises(ValueError, match="on_snapshot"):
        train_lora(pipe, d, cfg(5), log_every=0, snapshots=[3])


def test_captions_swap_only_the_concept_and_triggers_are_rare(pipe):
    phrases = ["a round red creature with two eyes", "a round red creature with two eyes and a hat"]
    cap = f"{phrases[0]} on the left and {phrases[1]} on the right at the beach"
    assert replace_phrase(cap, phrases, 1, "a rubox creature") == (
        "a round red creature with two eyes on the left and a rubox creature on the right at the beach")
    vocab = caption_vocabulary_ids(pipe.tokenizer, n=200)
    avoid = set(vocab)
    triggers = [pick_trigger(pipe.tokenizer, n, avoid) for n in ("rubo", "ruzi", "puna", "gaso", "gomo")]
    token_sets = [set(pipe.tokenizer(t).input_ids[1:-1]) for t in triggers]
    assert all(1 <= len(s) <= 2 and not (s & vocab) for s in token_sets)
    assert all(not (a & b) for i, a in enumerate(token_sets) for b in token_sets[i + 1:])
    d = world_identity_data("puna", f"a {triggers[2]} creature", n=5, seed=0)
    assert all(f"a {triggers[2]} creature" in c for c in d.captions)
    assert not any("pointy pink creature with yellow spots" in c for c in d.captions)


def test_cli_trains_from_a_folder(tmp_path, pipe, data):
    from loraclr.cli import main

    base = tmp_path / "base"
    pipe.save_pretrained(str(base))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (im, cap) in enumerate(zip(data.images[:3], data.captions[:3], strict=True)):
        Image.fromarray(im).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(cap, encoding="utf-8")
    out = tmp_path / "out.safetensors"
    rc = main(["train-lora", "--images", str(imgs), "--base", str(base), "-o", str(out), "--steps", "2",
               "--batch", "2", "--rank", "2", "--alpha", "1", "--trigger", "rubox", "--no-autocast",
               "--snapshots", "1"])
    assert rc == 0
    lora = load_lora(out)
    assert lora.metadata["modelspec.trigger_phrase"] == "rubox" and lora.metadata["ss_steps"] == "2"
    snap = load_lora(tmp_path / "out-s1.safetensors")  # the run after its first step
    assert snap.metadata["ss_steps"] == "1" and snap.layers.keys() == lora.layers.keys()
    assert {layer.rank for layer in lora.layers.values()} == {2}
    assert {layer.alpha for layer in lora.layers.values()} == {1.0}


def test_cli_checks_the_output_before_training(tmp_path, monkeypatch, capsys):
    """A missing output folder or a wrong ED-LoRA suffix fails before the base loads, not after the run."""
    import loraclr.pipeline
    from loraclr.cli import main

    def no_load(*a, **k):
        raise AssertionError("the base was loaded before the output path was checked")

    monkeypatch.setattr(loraclr.pipeline, "load_base", no_load)
    missing = tmp_path / "nope" / "out.safetensors"
    assert main(["train-lora", "--world-identity", "rubo", "-o", str(missing), "--steps", "2"]) != 0
    assert "does not exist; create it first" in capsys.readouterr().err
    assert main(["train-lora", "--world-identity", "rubo", "--edlora", "-o", str(tmp_path / "x.safetensors")]) != 0
    assert "name it *.pth" in capsys.readouterr().err


def test_cli_shows_progress_and_picks_fp32_where_bf16_is_emulated(tmp_path, pipe, data, capsys, monkeypatch):
    """train-lora shows a progress bar with steps/s and the time left from the first step (none with --quiet),
    and by default trains in fp32 on a CPU that would only emulate bf16."""
    import re

    import loraclr.runtime
    from loraclr.cli import main

    monkeypatch.setattr(loraclr.runtime, "cpu_has_native_bf16", lambda: False)
    loraclr.runtime._auto_precision.cache_clear()
    base = tmp_path / "base"
    pipe.save_pretrained(str(base))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (im, cap) in enumerate(zip(data.images[:2], data.captions[:2], strict=True)):
        Image.fromarray(im).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(cap, encoding="utf-8")
    argv = ["train-lora", "--images", str(imgs), "--base", str(base), "--steps", "3", "--batch", "1", "--rank", "1",
            "--trigger", "rubox", "--threads", "1", "--no-text-encoder"]
    try:
        assert main([*argv, "-o", str(tmp_path / "a.safetensors")]) == 0
        err = capsys.readouterr().err
        assert re.search(r"train a\.safetensors: 100%.*3/3 \[[0-9:]+<[0-9:]+, +[0-9.]+(step/s|s/step)", err), err
        assert load_lora(tmp_path / "a.safetensors").metadata["ss_mixed_precision"] == "no"  # auto: fp32 here
        assert main([*argv, "-o", str(tmp_path / "b.safetensors"), "--quiet"]) == 0
        assert "3/3" not in capsys.readouterr().err
    finally:
        loraclr.runtime._auto_precision.cache_clear()
        loraclr.runtime._command_line_precision = None
