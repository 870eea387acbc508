"""Feature collection on tiny SD1 / SDXL pipelines: the recorded rows reproduce each concept's own layer
outputs in closed form, trigger positions and renamed tokens are right, and subsampling stays within tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_factory import random_loraset, random_token

from loraclr.features import (
    ConceptFeaturesInput,
    TokenTable,
    add_tokens,
    apply_layers,
    collect_cross_attention,
    collect_spatial,
    collect_text_encoder,
    conditioning,
    encode,
    plan_tokens,
    sample_latents,
    trigger_positions,
)
from loraclr.models import build_pipeline, find_module
from loraclr.recipe import FeatureSettings
from loraclr.surgery.hooks import cross_attention_modules

TRIGGERS = ["sks man", "zwx dog", "qrt cat"]


def _concepts(pipe, n=3, only=None):
    out = []
    for i in range(n):
        lora = random_loraset(pipe, seed=i, only=only)
        prompts = [f"photo of a {TRIGGERS[i]}", TRIGGERS[i]]
        strengths = {"unet": 1.0, "text_encoder": 0.8, "text_encoder_2": 0.8}
        out.append(ConceptFeaturesInput(f"c{i}", lora.layers, strengths, prompts, TRIGGERS[i]))
    return out


def _record_outputs(module):
    outs = []
    handle = module.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    return outs, handle


def _check_closed_form(X, W0, delta, module, outputs):
    """X (W0 + dW)^T (+ bias) must equal what the module produced with the concept's LoRA active."""
    Y = X @ (W0 + delta).T
    if module.bias is not None:
        Y = Y + module.bias.detach()
    if isinstance(module, torch.nn.Conv2d):
        got = torch.cat([o.permute(0, 2, 3, 1).reshape(-1, o.shape[1]) for o in outputs])
    else:
        got = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])
    torch.testing.assert_close(Y, got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_rows_give_the_concepts_own_outputs(family, tiny_sd1, tiny_sdxl):
    pipe = tiny_sd1 if family == "sd1" else tiny_sdxl
    concepts = _concepts(pipe)
    table = TokenTable(n_layers=len(cross_attention_modules(pipe.unet)))
    feats = collect_text_encoder(pipe, concepts, table, FeatureSettings(max_rows=0, text_encoder_rows="prompt"))
    components = {k.split(".")[0] for k in feats.keys}
    assert components == ({"text_encoder"} if family == "sd1" else {"text_encoder", "text_encoder_2"})
    key = next(k for k in feats.keys if k.endswith("layers.1.mlp.fc2"))
    module = find_module(pipe, key)
    problem = next(p for p in feats.problems() if p.key == key)
    c = concepts[1]
    with apply_layers(pipe, {k: v for k, v in c.layers.items() if not k.startswith("unet")}, c.strengths):
        outs, handle = _record_outputs(module)  # registered after the LoRA hook: sees the LoRA'd output
        try:
            for t in c.prompts:
                encode(pipe, [t], pad=False)
        finally:
            handle.remove()
    outs = outs[: len(c.prompts)]  # SDXL runs both encoders; this key lives in one of them
    # every unpadded token of both prompts: "photo of a zwx dog" = 7 tokens with BOS/EOS, "zwx dog" = 4
    n_tokens = sum(len(pipe.tokenizer(t).input_ids) for t in c.prompts)
    assert problem.X[1].shape == (n_tokens, module.in_features) and problem.n_rows[1] == n_tokens
    torch.testing.assert_close(problem.deltas[1], 0.8 * c.layers[key].delta())  # strength is part of dW_i
    up, down, scale = c.factors(key, tuple(module.weight.shape))  # the feature-free merge's factored form
    torch.testing.assert_close(scale * up @ down, problem.deltas[1])
    _check_closed_form(problem.X[1], problem.W0, problem.deltas[1], module, outs)
    # default: padding positions too (the UNet attends to all of them): 77 rows per prompt
    padded = collect_text_encoder(pipe, concepts[:1], table, FeatureSettings(max_rows=0))
    assert next(padded.problems()).X[0].shape[0] == 2 * pipe.tokenizer.model_max_length


def test_stage_weights_are_views_and_changes_are_refused(tiny_sd1):
    """W0 is the live fp32 weight (no copy); fusing anything before the stage is solved is an error."""
    from loraclr.io.checkpoint import fuse_deltas

    pipe = tiny_sd1
    concepts = _concepts(pipe)
    table = TokenTable(n_layers=len(cross_attention_modules(pipe.unet)))
    feats = collect_text_encoder(pipe, concepts[:1], table, FeatureSettings(max_rows=0))
    key = feats.keys[0]
    weight = find_module(pipe, key).weight
    first = next(feats.problems())
    assert first.key == key and first.W0.data_ptr() == weight.data_ptr()  # shares the weight's memory
    assert len(list(feats.problems())) == len(feats.keys)  # unchanged weights: every problem is built
    saved = weight.detach().clone()
    try:
        fuse_deltas(pipe, {key: torch.zeros_like(weight)})  # an in-place update, even of zeros
        with pytest.raises(RuntimeError, match=key.replace(".", r"\.") + ".*changed after the text_encoder"):
            list(feats.problems())
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_cross_attention_rows_are_trigger_positions_plus_eot(tiny_sdxl):
    pipe = tiny_sdxl
    concepts = _concepts(pipe)
    table = TokenTable(n_layers=len(cross_attention_modules(pipe.unet)))
    feats = collect_cross_attention(pipe, concepts, table, FeatureSettings(cross_attention_rows="trigger"))
    assert feats.keys and all(k.endswith(("attn2.to_k", "attn2.to_v")) for k in feats.keys)
    problem = next(feats.problems())
    c = concepts[2]
    rows = []
    for p in c.prompts:
        states, _ = encode(pipe, [p], pad=False)  # SDXL: both encoders' penultimate states, concatenated
        pos = trigger_positions(pipe.tokenizer, p, c.trigger)
        rows.append(states[0, pos])
    # "photo of a qrt cat" -> BOS photo of a q rt cat EOS: the trigger is "q" "rt" "cat" = 4..6, EOT = 7
    assert trigger_positions(pipe.tokenizer, c.prompts[0], c.trigger) == [4, 5, 6, 7]
    assert trigger_positions(pipe.tokenizer, c.prompts[1], c.trigger) == [1, 2, 3, 4]
    assert problem.X[2].shape[1] == pipe.unet.config.cross_attention_dim == 64
    torch.testing.assert_close(problem.X[2], torch.cat(rows))
    padded = collect_cross_attention(pipe, concepts, table, FeatureSettings())  # default: all 77 positions
    X = next(padded.problems()).X[2]
    torch.testing.assert_close(X[:77], encode(pipe, [c.prompts[0]], pad=True)[0][0])
    assert X.shape[0] == 2 * 77


def test_trigger_not_in_prompt_is_a_clear_error(tiny_sd1):
    with pytest.raises(ValueError, match="'sks man' does not appear in the prompt 'a dog'"):
        trigger_positions(tiny_sd1.tokenizer, "a dog", "sks man", where="concept x")


def test_spatial_rows_reproduce_outputs_and_are_deterministic(tiny_sd1):
    pipe = tiny_sd1
    concepts = _concepts(pipe)
    table = TokenTable(n_layers=len(cross_attention_modules(pipe.unet)))
    # one prompt, fp32 (what sample_latents runs below): the run re-done below
    settings = FeatureSettings(steps=2, max_rows=0, spatial_prompts=1, precision="float32")
    key = "unet.down_blocks.0.attentions.0.proj_in"  # a 1x1 conv in the tiny SD1 UNet
    module = find_module(pipe, key)
    feats = collect_spatial(pipe, concepts[:2], table, settings)
    # the concept's own model, run independently: same prompt, seed and steps
    c = concepts[1]
    states, per_layer, added = conditioning(pipe, table, c.prompts[:1], 16, 16)
    with apply_layers(pipe, {k: v for k, v in c.layers.items() if k.startswith("unet")}, c.strengths):
        outs, handle = _record_outputs(module)
        try:
            sample_latents(pipe, states, added, steps=2, height=16, width=16, seed=settings.seed)
        finally:
            handle.remove()
    assert key in feats.keys and not any(k.endswith(("attn2.to_k", "attn2.to_v")) for k in feats.keys)
    problem = next(p for p in feats.problems() if p.key == key)
    # 2 steps x 8x8 latent positions, batch 1, every row kept
    assert problem.X[0].shape == (2 * 64, module.in_channels)
    _check_closed_form(problem.X[1], problem.W0, problem.deltas[1], module, outs)
    only_key = [dict(c.__dict__, layers={key: c.layers[key]}) for c in concepts[:2]]
    small = [ConceptFeaturesInput(**d) for d in only_key]  # one layer: the capped runs stay cheap
    capped = collect_spatial(pipe, small, table, FeatureSettings(steps=2, max_rows=40))
    again = collect_spatial(pipe, small, table, FeatureSettings(steps=2, max_rows=40))
    p1 = next(p for p in capped.problems() if p.key == key)
    p2 = next(p for p in again.problems() if p.key == key)
    # 2 steps x 64 positions x the default's 2 feature prompts (one batch), capped at 40 kept rows
    assert p1.X[0].shape == (40, module.in_channels) and p1.n_rows == [256, 256]
    assert torch.equal(p1.X[0], p2.X[0]) and torch.equal(p1.X[1], p2.X[1])
    # the kept rows are rows of the full recording (of the same one-layer concepts)
    full = next(collect_spatial(pipe, small, table, FeatureSettings(steps=2, max_rows=0)).problems()).X[0]
    assert all(((full - r).abs().sum(1) < 1e-5).any() for r in p1.X[0])


def test_spill_to_disk_matches_memory(tiny_sd1, tmp_path):
    concepts = _concepts(tiny_sd1, n=2)
    table = TokenTable(n_layers=7)
    mem = collect_spatial(tiny_sd1, concepts, table, FeatureSettings(steps=2, max_rows=32))
    disk = collect_spatial(tiny_sd1, concepts, table, FeatureSettings(steps=2, max_rows=32), spill_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept0.safetensors", "concept1.safetensors"]
    for a, b in zip(mem.problems(), disk.problems(), strict=True):
        assert a.key == b.key and all(torch.equal(x, y) for x, y in zip(a.X, b.X, strict=True))


@pytest.mark.slow  # two full feature runs of three concepts
def test_subsampling_tolerance_on_a_least_squares_merge(tiny_sd1):
    """Capping rows changes the least-squares merge of a spatial layer by a bounded amount (stated here)."""
    from loraclr.merge.methods import get_method, make_config

    concepts = _concepts(tiny_sd1)
    table = TokenTable(n_layers=7)
    full = collect_spatial(tiny_sd1, concepts, table, FeatureSettings(steps=3, max_rows=0))
    capped = collect_spatial(tiny_sd1, concepts, table, FeatureSettings(steps=3, max_rows=64))
    spec, cfg = get_method("lstsq"), make_config("lstsq")
    errs = []
    for pf, pc in zip(full.problems(), capped.problems(), strict=True):
        if pf.X[0].shape[0] <= 64 or pf.W0.shape[1] > 16:
            continue  # only layers where the cap bites (192 -> 64 rows) and rows still exceed the width 4x
        Df, Dc = spec.fn(pf, cfg, None).offset, spec.fn(pc, cfg, None).offset
        # judge both on the FULL features: relative output error of the merge on each concept's own rows
        def err(D, p=pf):
            return max(float((X @ (D - dW).T).norm() / (X @ (p.W0 + dW).T).norm())
                       for X, dW in zip(p.X, p.deltas, strict=True))
        errs.append((pf.key, err(Df), err(Dc)))
    assert len(errs) >= 5
    for _key, e_full, e_capped in errs:
        # measured: capping 256 -> 96 rows moved the error by at most 0.008 (0.154 -> 0.161; naive sum 0.41)
        assert e_capped <= e_full + 0.02


def test_learned_tokens_are_renamed_per_concept():
    pipe = build_pipeline("sd1", "tiny", seed=1)
    n_layers = len(cross_attention_modules(pipe.unet))
    a = random_token(pipe, "<sks>", seed=1)
    b = random_token(pipe, "<sks>", seed=2, n_vectors=2)  # same name, another concept: must not collide
    ed = random_token(pipe, "<elsa1>", seed=3, n_vectors=n_layers, layerwise=True)
    table = TokenTable(n_layers=n_layers)
    for concept, toks in (("alice", [a]), ("bob", [b]), ("carol", [ed])):
        table.tokens.extend(plan_tokens(concept, toks, n_layers))
    add_tokens(pipe, table)
    assert [t.name for t in table.tokens] == ["<alice-sks>", "<bob-sks>", "<carol-elsa1>"]
    tok, emb = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight
    assert table.expand(table.rename("bob", "photo of <sks>")) == "photo of <bob-sks> <bob-sks-v1>"
    assert table.expand("<carol-elsa1> smiling", layer=3) == "<carol-elsa1-l3> smiling"
    assert len(table.variants("<carol-elsa1>")) == n_layers and table.variants("<alice-sks>") == ["<alice-sks>"]
    ids = tok("photo of <bob-sks> <bob-sks-v1>").input_ids
    assert len(ids) == 6  # BOS photo of <bob-sks> <bob-sks-v1> EOS: each new token is one id
    torch.testing.assert_close(emb[ids[3]], b.embeddings["text_encoder"][0])
    torch.testing.assert_close(emb[ids[4]], b.embeddings["text_encoder"][1])
    alice_id = tok.convert_tokens_to_ids("<alice-sks>")
    torch.testing.assert_close(emb[alice_id], a.embeddings["text_encoder"][0])
    l5 = tok.convert_tokens_to_ids("<carol-elsa1-l5>")
    torch.testing.assert_close(emb[l5], ed.embeddings["text_encoder"][5])
    with pytest.raises(ValueError, match="has 16 embeddings but the base UNet has 7"):
        plan_tokens("dan", [random_token(pipe, "<x>", 4, n_vectors=16, layerwise=True)], n_layers, "ed.pth")


def test_layerwise_cross_attention_features(tiny_sd1):
    """ED-LoRA: cross-attention layer l gets the states of the prompts bound to the token's layer-l entry."""
    pipe = copy.deepcopy(tiny_sd1)
    n_layers = len(cross_attention_modules(pipe.unet))
    ed = random_token(pipe, "<elsa1>", seed=3, n_vectors=n_layers, layerwise=True)
    table = TokenTable(n_layers=n_layers, tokens=plan_tokens("carol", [ed], n_layers))
    add_tokens(pipe, table)
    lora = random_loraset(pipe, 0, only=lambda k: k.endswith(("attn2.to_k", "attn2.to_v")))
    c = ConceptFeaturesInput("carol", lora.layers, {"unet": 1.0}, ["photo of <carol-elsa1>"], "<carol-elsa1>")
    feats = collect_cross_attention(pipe, [c], table, FeatureSettings(cross_attention_rows="trigger"))
    names = [f"unet.{n}" for n, _ in cross_attention_modules(pipe.unet)]
    by_key = {p.key: p.X[0] for p in feats.problems()}
    for layer in (0, 4):
        states, _ = encode(pipe, [f"photo of <carol-elsa1-l{layer}>"], pad=False)
        torch.testing.assert_close(by_key[names[layer] + ".to_k"], states[0, [3, 4]])  # token + EOT
    assert not torch.allclose(by_key[names[0] + ".to_k"], by_key[names[4] + ".to_k"])


def test_spatial_resolution_caps_the_native_size(tiny_sd1):
    """None = native size capped at max_resolution (rounded to what the UNet takes); explicit wins."""
    from loraclr.features.collect import native_resolution, spatial_resolution

    native = native_resolution(tiny_sd1)  # tiny SD1: 8 x 8 latents x VAE factor
    assert spatial_resolution(tiny_sd1, FeatureSettings()) == native  # below the default cap: unchanged
    assert spatial_resolution(tiny_sd1, FeatureSettings(max_resolution=None)) == native
    step = tiny_sd1.vae_scale_factor * 2 ** (len(tiny_sd1.unet.config.block_out_channels) - 1)
    assert spatial_resolution(tiny_sd1, FeatureSettings(max_resolution=native - 1)) == native - step
    assert spatial_resolution(tiny_sd1, FeatureSettings(max_resolution=1)) == step
    assert spatial_resolution(tiny_sd1, FeatureSettings(resolution=3 * native, max_resolution=8)) == 3 * native
