"""Regional composition (loraclr.regional): masks, checks, and both mechanisms' algebra on tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "features"))
from lora_factory import random_loraset, random_token  # noqa: E402

from loraclr.cli import main  # noqa: E402
from loraclr.models import build_pipeline  # noqa: E402
from loraclr.pipeline import Model, generate  # noqa: E402
from loraclr.regional import (  # noqa: E402
    Region,
    RegionalPlan,
    attention_grids,
    blend_weights,
    check_boxes,
    coverage,
    load_regions,
    parse_region,
)
from loraclr.surgery.hooks import apply_layers, cross_attention_modules  # noqa: E402
from loraclr.surgery.tokens import TokenTable, add_tokens, encode, plan_tokens  # noqa: E402

FULL = (0.0, 0.0, 1.0, 1.0)
KW = dict(steps=4, guidance=3.0, progress=False)


def sensitive(family: str):
    """A tiny pipeline whose images depend clearly on the prompt (random cross-attention is nearly silent)."""
    pipe = build_pipeline(family, "tiny", seed=0)
    with torch.no_grad():
        for _, mod in cross_attention_modules(pipe.unet):
            mod.to_v.weight.mul_(8)
            mod.to_out[0].weight.mul_(4)
    return pipe


@pytest.fixture(scope="module")
def sd1():
    return sensitive("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return sensitive("sdxl")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def assert_same(a, b, tol: int = 1):
    assert np.abs(pixels(a) - pixels(b)).max() <= tol


def assert_differ(a, b):
    assert np.abs(pixels(a) - pixels(b)).max() > 8


# --- parsing and masks --------------------------------------------------------------------------------------


def test_parse_region_and_errors():
    assert parse_region("0,0.25,0.5,1:{rubo} at the beach: sunny") == Region((0, 0.25, 0.5, 1),
                                                                            "{rubo} at the beach: sunny")
    for bad, msg in (("0,0,1:x", "four numbers"), ("a,b,c,d:x", "four numbers"), ("0,0,1,1", "expected"),
                     ("0,0,1,1:  ", "expected")):
        with pytest.raises(ValueError, match=msg):
            parse_region(bad)


def test_regions_file_yaml_json_and_errors(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("prompt: two\nmode: noise\nstart: 0.4\nregions:\n  - {box: [0, 0, 0.5, 1], prompt: a}\n"
                 "  - {box: [0.5, 0, 1, 1], prompt: b, negative: c}\n")
    got = load_regions(y)
    assert got["prompt"] == "two" and got["mode"] == "noise" and got["start"] == 0.4
    assert got["regions"] == [Region((0, 0, 0.5, 1), "a"), Region((0.5, 0, 1, 1), "b", "c")]
    j = tmp_path / "r.json"
    j.write_text('[{"box": [0, 0, 1, 1], "prompt": "x"}]')
    assert load_regions(j)["regions"] == [Region(FULL, "x")]
    for text, msg in (('{"regions": [{"box": [0, 0, 1], "prompt": "x"}]}', "four numbers"),
                      ('{"regions": [{"box": [0, 0, 1, 1]}]}', "needs 'box'"),
                      ('{"regions": [], "size": 3}', "unknown fields"),
                      ('{"regions": [{"box": [0, 0, 1, 1], "prompt": "x", "weight": 2}]}', "unknown fields"),
                      ("{", "not valid JSON")):
        j.write_text(text)
        with pytest.raises(ValueError, match=msg) as e:
            load_regions(j)
        assert str(j) in str(e.value)
    with pytest.raises(FileNotFoundError, match="regions file not found"):
        load_regions(tmp_path / "none.yaml")


def test_coverage_and_blend_weights():
    c = coverage((0.0, 0.0, 0.5, 0.25), 4, 4)
    expected = torch.zeros(4, 4)
    expected[0, :2] = 1.0
    torch.testing.assert_close(c, expected)
    assert coverage((0.1, 0.0, 0.3, 1.0), 1, 4)[0].tolist() == pytest.approx([0.6, 0.2, 0, 0])  # partial cells
    # two boxes overlapping in the middle column, a third cell uncovered
    regional, keep = blend_weights([(0, 0, 2 / 3, 1), (1 / 3, 0, 1, 1)], 1, 3)
    torch.testing.assert_close(regional, torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]))
    torch.testing.assert_close(keep, torch.zeros(3))
    regional, keep = blend_weights([(0, 0, 0.5, 1)], 1, 4)
    torch.testing.assert_close(keep, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    regional, keep = blend_weights([(0.1, 0.2, 0.7, 0.9), (0.3, 0.0, 1.0, 0.6)], 5, 7)
    torch.testing.assert_close(regional.sum(0) + keep, torch.ones(35))  # weights sum to one everywhere
    assert (keep >= 0).all() and (regional >= 0).all()


def test_attention_grids_follow_the_unet(tiny_sd1, tiny_sdxl):
    grids = attention_grids(tiny_sd1.unet, (8, 8))
    assert [g[0] for g in grids] == [n for n, _ in cross_attention_modules(tiny_sd1.unet)]
    assert {n.split(".")[0] + "." + n.split(".")[1]: (h, w) for n, h, w in grids} == {
        "down_blocks.0": (8, 8), "down_blocks.1": (4, 4), "mid_block.attentions": (4, 4),
        "up_blocks.0": (4, 4), "up_blocks.1": (8, 8)}
    # the positions the layers really see: record their query lengths
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, k, n=n: seen.__setitem__(n, a[0].shape[1]), with_kwargs=True)
             for n, m in cross_attention_modules(tiny_sd1.unet)]
    try:
        ehs = torch.zeros(1, 77, tiny_sd1.unet.config.cross_attention_dim)
        tiny_sd1.unet(torch.zeros(1, 4, 8, 6), 10, encoder_hidden_states=ehs)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {n: h * w for n, h, w in attention_grids(tiny_sd1.unet, (8, 6))}
    assert {(h, w) for _, h, w in attention_grids(tiny_sdxl.unet, (8, 8))} == {(4, 4)}


def test_check_boxes_errors(tiny_sd1):
    grids = attention_grids(tiny_sd1.unet, (8, 8))
    check_boxes([Region((0, 0.25, 0.5, 1), "a"), Region((0.5, 0.25, 1, 1), "b")], grids, (16, 16))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        check_boxes([Region((0, 0, 1.2, 1), "a")], grids, (16, 16))
    with pytest.raises(ValueError, match="empty"):
        check_boxes([Region((0.5, 0, 0.5, 1), "a")], grids, (16, 16))
    with pytest.raises(ValueError, match=r"too small for down_blocks\.1\..*4x4 cells.*0\.25 of the width"):
        check_boxes([Region((0, 0, 1, 1), "a"), Region((0.25, 0.25, 0.4, 0.4), "b")], grids, (16, 16))
    with pytest.raises(ValueError, match="at most 16"):
        check_boxes([Region(FULL, "a")] * 17, grids, (16, 16))
    with pytest.raises(ValueError, match="unknown region mode"):
        RegionalPlan((Region(FULL, "a"),), mode="latent")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RegionalPlan((Region(FULL, "a"),), start=1.0)


# --- the mechanisms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("mode", ["attention", "noise", "area"])
def test_a_full_image_region_replaces_the_prompt(family, mode, sd1, sdxl):
    """A box over the whole image makes its prompt the prompt everywhere: the image equals plain sampling
    with that prompt; the same prompt as the global one changes nothing."""
    pipe = sd1 if family == "sd1" else sdxl
    model = Model(pipe)
    plain_a = generate(model, ["a red cat"], **KW)
    plain_b = generate(model, ["a blue dog"], **KW)
    assert_differ(plain_a, plain_b)
    if family == "sdxl" and mode == "attention":
        # cross-attention is regional, SDXL's pooled text embedding (added conditioning) stays the global one
        states, _ = encode(pipe, ["a blue dog"])
        _, pooled = encode(pipe, ["a red cat"])
        plain_b = pipe(prompt_embeds=states, pooled_prompt_embeds=pooled, negative_prompt="", guidance_scale=3.0,
                       num_inference_steps=4, height=16, width=16, generator=torch.Generator().manual_seed(0)).images
    plan = RegionalPlan((Region(FULL, "a blue dog"),), mode=mode, start=0.0)
    assert_same(generate(model, ["a red cat"], regions=plan, **KW), plain_b)
    same = RegionalPlan((Region(FULL, "a red cat"),), mode=mode, start=0.0)
    assert_same(generate(model, ["a red cat"], regions=same, **KW), plain_a)
    # two full boxes with the same prompt average to that prompt
    twice = RegionalPlan((Region(FULL, "a blue dog"), Region(FULL, "a blue dog")), mode=mode, start=0.0)
    assert_same(generate(model, ["a red cat"], regions=twice, **KW), plain_b)


@pytest.mark.parametrize("start, active", [(0.0, 4), (0.5, 2), (0.7, 1)])
def test_start_leaves_the_first_steps_to_the_global_prompt(start, active, sd1):
    calls = []
    h = sd1.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        plan = RegionalPlan((Region((0, 0, 0.5, 1), "a blue dog"),), mode="noise", start=start)
        generate(Model(sd1), ["a red cat"], regions=plan, **KW)
    finally:
        h.remove()
    assert len(calls) == 4 + active  # one region pass per step where regions act


def _unet_call(pipe, states, latents, t=500):
    return pipe.unet(latents, t, encoder_hidden_states=states).sample


@pytest.mark.parametrize("mode", ["attention", "noise"])
def test_outside_the_boxes_nothing_changes(mode, sd1):
    """Exact locality where the mechanism guarantees it: noise mode blends predictions per latent cell, so
    outside the box the prediction is the global one and inside it the region prompt's; attention mode
    does the same per cross-attention position."""
    from loraclr.regional import encode_regions, regional_sampling
    from loraclr.surgery.tokens import encode

    model = Model(sd1)
    plan = RegionalPlan((Region((0, 0, 0.5, 1), "a blue dog"),), mode=mode, start=0.0)
    enc = encode_regions(model, plan.regions)
    glob, _ = encode(sd1, ["a red cat"])
    reg, _ = encode(sd1, ["a blue dog"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = _unet_call(sd1, glob, latents)
    if mode == "noise":
        with torch.no_grad(), regional_sampling(model, plan, enc, size=(16, 16), steps=1, guidance=1.0):
            got = _unet_call(sd1, glob, latents)
        torch.testing.assert_close(got[..., 4:], plain[..., 4:])
        torch.testing.assert_close(got[..., :4], _unet_call(sd1, reg, latents)[..., :4], rtol=1e-5, atol=1e-5)
        return
    name, attn = cross_attention_modules(sd1.unet)[0]  # down_blocks.0: an 8 x 8 grid
    x = torch.randn(1, 64, attn.to_q.in_features)
    with torch.no_grad():
        plain_attn, region_attn = attn(x, encoder_hidden_states=glob), attn(x, encoder_hidden_states=reg)
        with regional_sampling(model, plan, enc, size=(16, 16), steps=1, guidance=1.0):
            sd1.unet(latents, 500, encoder_hidden_states=glob)  # counts the step
            got = attn(x, encoder_hidden_states=glob)
    cols = torch.arange(64) % 8
    torch.testing.assert_close(got[:, cols >= 4], plain_attn[:, cols >= 4])
    torch.testing.assert_close(got[:, cols < 4], region_attn[:, cols < 4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["attention", "noise"])
def test_regions_leave_no_hooks(mode, sd1):
    model = Model(sd1)
    procs = {n: type(m.processor) for n, m in cross_attention_modules(sd1.unet)}
    left = RegionalPlan((Region((0, 0, 0.5, 1), "a blue dog"),), mode=mode, start=0.0)
    assert_differ(generate(model, ["a red cat"], regions=left, **KW), generate(model, ["a red cat"], **KW))
    assert {n: type(m.processor) for n, m in cross_attention_modules(sd1.unet)} == procs
    assert not sd1.unet._forward_hooks and not sd1.unet._forward_pre_hooks


def test_region_negative_prompt_is_used(sd1):
    model = Model(sd1)
    base = RegionalPlan((Region(FULL, "a blue dog"),), start=0.0)
    neg = RegionalPlan((Region(FULL, "a blue dog", negative="a green bird"),), start=0.0)
    assert_same(generate(model, ["x"], regions=neg, **KW),
                generate(model, ["a blue dog"], negative="a green bird", **KW))
    assert_differ(generate(model, ["x"], regions=neg, **KW), generate(model, ["x"], regions=base, **KW))


def test_noise_mode_with_a_lora_per_region_equals_that_lora_alone(tmp_path):
    """The per-region own-LoRA reference: a full box drawn by its own LoRA is that LoRA's image."""
    pipe = sensitive("sd1")
    lora = random_loraset(pipe, seed=3, scale=0.3)
    model = Model(pipe)
    with apply_layers(pipe, lora.layers):
        expected = generate(model, ["a blue dog"], **KW)
    plan = RegionalPlan((Region(FULL, "a blue dog"),), mode="noise", start=0.0)
    got = generate(model, ["a red cat"], regions=plan, region_layers=[lora.layers], **KW)
    assert_same(got, expected)
    assert_differ(got, generate(model, ["a blue dog"], **KW))
    with pytest.raises(ValueError, match="need the noise or area mode"):
        generate(model, ["a red cat"], regions=RegionalPlan(plan.regions, start=0.0), region_layers=[lora.layers], **KW)


def test_layerwise_tokens_in_region_prompts():
    """ED-LoRA layer-wise tokens: a region prompt that uses one is encoded per cross-attention layer."""
    pipe = sensitive("sd1")
    n_layers = len(cross_attention_modules(pipe.unet))
    tok = random_token(pipe, "<v1>", seed=5, layerwise=True)
    tok.embeddings = {c: torch.randn(n_layers, e.shape[1]) * 0.5 for c, e in tok.embeddings.items()}
    table = TokenTable(plan_tokens("vee", [tok], n_layers), n_layers=n_layers)
    add_tokens(pipe, table)
    model = Model(pipe, table, {"vee": table.tokens[0].name})
    plain = generate(model, ["a {vee} dog"], **KW)
    for mode in ("attention", "noise", "area"):
        got = generate(model, ["a red cat"], regions=RegionalPlan((Region(FULL, "a {vee} dog"),), mode=mode, start=0.0), **KW)
        assert_same(got, plain)
        # the global prompt with layer-wise tokens too, and regions of another batch size than the global call
        got = generate(model, ["a {vee} dog"], regions=RegionalPlan((Region(FULL, "a {vee} dog"),), mode=mode,
                                                                    start=0.5), **KW)
        assert_same(got, plain)
        halves = RegionalPlan((Region((0, 0, 0.5, 1), "a {vee} dog"), Region((0.5, 0, 1, 1), "a red cat"),
                               Region((0.25, 0, 0.75, 1), "a cat")), mode=mode, start=0.0)
        assert_differ(generate(model, ["a {vee} dog"], regions=halves, **KW), plain)
    # the recipe's own token name is rewritten to the merged one
    assert_same(generate(model, ["a <v1> dog"], **KW), plain)


def test_prompt_checks_before_sampling(tiny_sd1):
    model = Model(tiny_sd1, TokenTable(), {"rubo": "<rubo-x>"})
    calls = []
    h = tiny_sd1.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"region 1 prompt .*unknown concept \{tobi\}; known: \{rubo\}"):
            generate(model, ["a cat"], regions=RegionalPlan((Region(FULL, "{tobi} cat"),), start=0.0), **KW)
        with pytest.raises(ValueError, match=r"unknown token '<nope>'"):
            generate(model, ["a <nope> cat"], **KW)
        with pytest.raises(ValueError, match=r"region 2 prompt .* tokens, the text encoder reads 77"):
            generate(model, ["a cat"], regions=RegionalPlan((Region(FULL, "a"), Region(FULL, "cat " * 90)), start=0.0), **KW)
    finally:
        h.remove()
    assert not calls  # nothing was sampled


def test_generate_cli_with_regions(tmp_path, capsys, tiny_sd1):
    tiny_sd1.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "o"
    rc = main(["generate", str(tmp_path / "base"), "a red cat", "--region", "0,0,0.5,1:a blue dog",
               "--region", "0.5,0,1,1:a green bird", "--steps", "2", "-o", str(out), "--quiet", "--threads", "1"])
    assert rc == 0 and (out / "000-0.png").is_file()
    (tmp_path / "r.yaml").write_text("prompt: a red cat\nmode: noise\nregions:\n"
                                     "  - {box: [0, 0, 0.5, 1], prompt: a blue dog}\n")
    rc = main(["generate", str(tmp_path / "base"), "--regions", str(tmp_path / "r.yaml"), "--steps", "2",
               "-o", str(tmp_path / "o2"), "--quiet"])
    assert rc == 0 and (tmp_path / "o2" / "000-0.png").is_file()
    rc = main(["generate", str(tmp_path / "base"), "a cat", "--region", "0,0,1.5,1:x", "-o", str(out), "--quiet"])
    assert rc == 2 and "coordinates are fractions" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["attention", "noise"])
def test_regions_with_a_structure_condition(mode, sd1, tmp_path):
    """A T2I-Adapter / ControlNet folder combined with regions: the condition is drawn from the boxes when no
    image is given, it changes the image, and the regional hooks still act under the structure pipeline."""
    from diffusers import ControlNetModel, T2IAdapter

    from loraclr.structure import layout_image, load_structure

    torch.manual_seed(1)
    adapter = T2IAdapter(in_channels=3, channels=list(sd1.unet.config.block_out_channels), num_res_blocks=1,
                         downscale_factor=sd1.vae_scale_factor, adapter_type="full_adapter")
    adapter.save_pretrained(str(tmp_path / "adapter"))
    cn = ControlNetModel.from_unet(sd1.unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            m.weight.normal_(0, 0.3)
    cn.save_pretrained(str(tmp_path / "cn"))
    model = Model(sd1)
    plan = RegionalPlan((Region((0, 0.25, 0.5, 1), "a blue dog"), Region((0.5, 0.25, 1, 1), "a green bird")),
                        mode=mode, start=0.0)
    regional = generate(model, ["a red cat"], regions=plan, **KW)
    for folder, scale in (("adapter", 4.0), ("cn", 1.0)):  # a random adapter steers little at scale 1
        structure = load_structure(tmp_path / folder, scale=scale)
        with_structure = generate(model, ["a red cat"], regions=plan, structure=structure, **KW)
        assert_differ(with_structure, regional)
        same_layout = layout_image([r.box for r in plan.regions], 16, 16)
        assert_same(generate(model, ["a red cat"], regions=plan, structure=structure, structure_image=same_layout,
                             **KW), with_structure)
        assert_differ(with_structure, generate(model, ["a red cat"], structure=structure,
                                               structure_image=same_layout, **KW))
        # every region pass gets the structure's residuals too: a full box with the global prompt changes nothing
        same = RegionalPlan((Region(FULL, "a red cat"),), mode=mode, start=0.0)
        assert_same(generate(model, ["a red cat"], regions=same, structure=structure, structure_image=same_layout,
                             **KW), generate(model, ["a red cat"], structure=structure, structure_image=same_layout,
                                             **KW))
    with pytest.raises(ValueError, match="needs a condition image"):
        generate(model, ["a red cat"], structure=structure, **KW)
    with pytest.raises(ValueError, match="area mode"):
        generate(model, ["a red cat"], regions=RegionalPlan(plan.regions, mode="area"), structure=structure, **KW)
