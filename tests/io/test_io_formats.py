"""Readers and writers: bit-exact round trips, kohya <-> diffusers, legacy layouts, ED-LoRA, TI, LyCORIS."""

from __future__ import annotations

import json

import pytest
import torch
from iohelpers import random_layers
from safetensors import safe_open
from safetensors.torch import save_file

from loraclr.io import factorize, load_embeddings, load_lora, save_embeddings, save_lora
from loraclr.lora import DenseDelta, LearnedToken, LoraLayer


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _same_layers(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].down, b[k].down), k
        assert torch.equal(a[k].up, b[k].up), k
        assert a[k].alpha == b[k].alpha, k


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_is_bit_exact(tmp_path, meta_sd15, meta_sdxl, family, fmt):
    comps = meta_sd15 if family == "sd1" else meta_sdxl
    # real-shaped but small subset (first block of each component) so the test stays fast
    layers = random_layers({k: v for k, v in comps.items() if k in ("unet", "text_encoder", "text_encoder_2")},
                           dtype=torch.float16, every=25)
    p1 = tmp_path / "a.safetensors"
    save_lora(layers, p1, format=fmt, family=family)
    lora = load_lora(p1)
    assert lora.format == fmt and lora.family == family
    _same_layers(layers, lora.layers)
    # writing what we read gives byte-identical tensors and the same keys
    p2 = tmp_path / "b.safetensors"
    save_lora(lora.layers, p2, format=fmt, family=family)
    t1, m1 = _read(p1)
    t2, m2 = _read(p2)
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) and t1[k].dtype == t2[k].dtype for k in t1)
    if fmt == "kohya":
        assert m1["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
        assert m1["modelspec.architecture"].endswith("/lora") and m1["ss_network_module"] == "networks.lora"
        if family == "sdxl":
            assert any(k.startswith("lora_unet_input_blocks_") for k in t1)
            assert any(k.startswith("lora_te2_") for k in t1)


def test_kohya_diffusers_conversion_preserves_every_delta(tmp_path, meta_sdxl):
    layers = random_layers({k: meta_sdxl[k] for k in ("unet", "text_encoder", "text_encoder_2")}, every=20)
    save_lora(layers, tmp_path / "k.safetensors", format="kohya", family="sdxl")
    k = load_lora(tmp_path / "k.safetensors")
    save_lora(k.layers, tmp_path / "d.safetensors", format="diffusers", family="sdxl")
    d = load_lora(tmp_path / "d.safetensors")
    save_lora(d.layers, tmp_path / "k2.safetensors", format="kohya", family="sdxl")
    k2 = load_lora(tmp_path / "k2.safetensors")
    for key, layer in layers.items():
        want = layer.delta()  # B A alpha / r
        assert torch.equal(d.layers[key].delta(), want), key
        assert torch.equal(k2.layers[key].delta(), want), key
    # alphas differ per layer: the diffusers file carries them as PEFT alpha_pattern
    _, meta = _read(tmp_path / "d.safetensors")
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.alpha_pattern"] or adapter["unet.lora_alpha"] in {v.alpha for v in layers.values()}


def test_factorize_rank_energy_and_error():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0] + [0.0] * 26)
    w = u[:, :30] @ torch.diag(s) @ v.T  # rank 4, singular values 8,4,2,1
    layer, err = factorize(w, rank=2)
    assert layer.rank == 2 and layer.alpha == 2.0
    # golden: ||W - W_2|| / ||W|| = sqrt(2^2 + 1^2) / sqrt(64 + 16 + 4 + 1)
    assert err == pytest.approx((5 / 85) ** 0.5, rel=1e-4)
    layer, err = factorize(w, energy=0.95)  # 64/85 = .753, 80/85 = .941, 84/85 = .988 -> rank 3
    assert layer.rank == 3 and err == pytest.approx((1 / 85) ** 0.5, rel=1e-4)
    layer, err = factorize(w, rank=8)
    assert layer.rank == 8 and err < 1e-5
    conv = torch.randn(6, 4, 3, 3, generator=g)
    layer, err = factorize(conv, rank=36)
    assert layer.down.shape == (6, 4, 3, 3) and layer.up.shape == (6, 6, 1, 1) and err < 1e-5
    with pytest.raises(ValueError, match="rank= or energy="):
        factorize(w)


def test_save_lora_factorizes_dense_and_reports(tmp_path):
    g = torch.Generator().manual_seed(2)
    dw = torch.randn(32, 3, generator=g) @ torch.randn(3, 32, generator=g)
    key = "unet.down_blocks.0.attentions.0.proj_in"
    report = save_lora({key: dw, "unet.down_blocks.0.attentions.0.proj_out": DenseDelta(dw * 2)},
                       tmp_path / "x.safetensors", format="diffusers", family="sd1", rank=3)
    assert report[key]["rank"] == 3 and report[key]["rel_error"] < 1e-5
    got = load_lora(tmp_path / "x.safetensors").layers[key].delta()
    assert torch.allclose(got, dw, atol=1e-4)


def _peft_sd(layers):
    return {f"{k}.lora_A.weight": v.down for k, v in layers.items()} | {f"{k}.lora_B.weight": v.up
                                                                          for k, v in layers.items()}


def test_diffusers_legacy_variants_read_the_same(tmp_path, tiny_sd1):
    layers = random_layers({"unet": tiny_sd1.unet, "text_encoder": tiny_sd1.text_encoder}, alpha=None)
    layers = {k: LoraLayer(v.down, v.up, float(v.rank)) for k, v in layers.items() if v.down.dim() == 2}
    attn = {k: v for k, v in layers.items() if ".attn1.to_" in k or ".attn2.to_" in k}
    te = {k: v for k, v in layers.items() if k.startswith("text_encoder")}
    # attention-processor layout
    proc = {}
    for k, v in attn.items():
        mod, _, leaf = k.rpartition(".")
        if leaf == "0":  # to_out.0
            mod, _, leaf = mod.rpartition(".")
        proc[f"{mod[len('unet.'):]}.processor.{leaf}_lora.down.weight"] = v.down
        proc[f"{mod[len('unet.'):]}.processor.{leaf}_lora.up.weight"] = v.up
    save_file(proc, str(tmp_path / "proc.safetensors"))
    got = load_lora(tmp_path / "proc.safetensors")
    assert got.format == "diffusers-legacy"
    _same_layers(attn, got.layers)
    # .lora.down and lora_linear_layer
    mixed = {f"{k}.lora.down.weight": v.down for k, v in attn.items()} | {
        f"{k}.lora.up.weight": v.up for k, v in attn.items()}
    mixed |= {f"{k}.lora_linear_layer.down.weight": v.down for k, v in te.items()}
    mixed |= {f"{k}.lora_linear_layer.up.weight": v.up for k, v in te.items()}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    _same_layers(attn | te, load_lora(tmp_path / "mixed.safetensors").layers)
    # raw PEFT dump of a UNet with an adapter name
    peft = {f"base_model.model.{k[len('unet.'):]}.lora_A.default.weight": v.down for k, v in attn.items()}
    peft |= {f"base_model.model.{k[len('unet.'):]}.lora_B.default.weight": v.up for k, v in attn.items()}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    got = load_lora(tmp_path / "peft.safetensors")
    assert got.format == "peft"
    _same_layers(attn, got.layers)


def test_peft_folder_alpha_from_adapter_config(tmp_path):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = LoraLayer(torch.randn(4, 32), torch.randn(16, 4), 4.0)
    d = tmp_path / "adapter"
    d.mkdir()
    save_file({f"base_model.model.{key[5:]}.lora_A.weight": layer.down,
               f"base_model.model.{key[5:]}.lora_B.weight": layer.up}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    got = load_lora(d).layers[key]
    assert got.alpha == 16.0 and got.scale == 4.0


@pytest.mark.parametrize("style", ["main", "research"])
def test_edlora_pickle(tmp_path, style):
    g = torch.Generator().manual_seed(3)
    suffix = (".lora_down.weight", ".lora_up.weight") if style == "main" else ("_lora.down.weight", "_lora.up.weight")
    te_mod = "text_model.encoder.layers.0.self_attn.q_proj"
    un_mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    params = {
        "new_concept_embedding": {"<cat1>": torch.randn(16, 768, generator=g), "<cat2>": torch.randn(16, 768, generator=g)},
        "text_encoder": {te_mod + suffix[0]: torch.randn(4, 768, generator=g), te_mod + suffix[1]: torch.randn(768, 4, generator=g)},
        "unet": {un_mod + suffix[0]: torch.randn(4, 768, generator=g), un_mod + suffix[1]: torch.randn(320, 4, generator=g)},
    }
    path = tmp_path / "edlora.pth"
    torch.save({"params": params}, path)
    lora = load_lora(path, allow_pickle=True)
    assert lora.format == "edlora" and lora.family == "sd1"
    assert [t.name for t in lora.tokens] == ["<cat1>", "<cat2>"] and all(t.layerwise for t in lora.tokens)
    assert torch.equal(lora.tokens[0].embeddings["text_encoder"], params["new_concept_embedding"]["<cat1>"])
    layer = lora.layers["unet." + un_mod]
    assert layer.alpha == 4.0 and torch.equal(layer.up, params["unet"][un_mod + suffix[1]])
    assert "text_encoder." + te_mod in lora.layers


def test_textual_inversion_files(tmp_path):
    g = torch.Generator().manual_seed(4)
    e1 = torch.randn(2, 768, generator=g)
    save_file({"emb_params": e1}, str(tmp_path / "mycat.safetensors"))
    ti = load_lora(tmp_path / "mycat.safetensors")
    assert ti.format == "textual-inversion" and not ti.layers and ti.family == "sd1"
    assert ti.tokens[0].name == "mycat" and torch.equal(ti.tokens[0].embeddings["text_encoder"], e1)
    torch.save({"string_to_param": {"*": e1}, "name": "x"}, tmp_path / "old.pt")
    assert torch.equal(load_lora(tmp_path / "old.pt", allow_pickle=True).tokens[0].embeddings["text_encoder"], e1)
    save_file({"<tok>": e1[0]}, str(tmp_path / "learned_embeds.safetensors"))
    assert load_lora(tmp_path / "learned_embeds.safetensors").tokens[0].name == "<tok>"
    l2, g2 = torch.randn(1, 768, generator=g), torch.randn(1, 1280, generator=g)
    save_file({"clip_l": l2, "clip_g": g2}, str(tmp_path / "xl.safetensors"))
    xl = load_lora(tmp_path / "xl.safetensors")
    assert xl.family == "sdxl" and torch.equal(xl.tokens[0].embeddings["text_encoder_2"], g2)
    # writers: a1111 folder of one file per token, diffusers single file; both read back exactly
    toks = [LearnedToken("<a>", {"text_encoder": e1}, layerwise=True), LearnedToken("<b>", {"text_encoder": e1 * 2})]
    files = save_embeddings(toks, tmp_path / "embs", format="a1111")
    assert sorted(f.name for f in files) == ["a.safetensors", "b.safetensors"]
    back = {t.name: t for t in load_embeddings(tmp_path / "embs")}
    assert back["<a>"].layerwise and not back["<b>"].layerwise
    assert torch.equal(back["<b>"].embeddings["text_encoder"], e1 * 2)
    save_embeddings(toks, tmp_path / "d.safetensors", format="diffusers")
    back = {t.name: t for t in load_embeddings(tmp_path / "d.safetensors")}
    assert set(back) == {"<a>", "<b>"} and torch.equal(back["<a>"].embeddings["text_encoder"], e1)


def test_tokens_saved_beside_lora_come_back(tmp_path):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layers = {key: LoraLayer(torch.randn(2, 768), torch.randn(320, 2), 2.0)}
    tok = LearnedToken("<dog>", {"text_encoder": torch.randn(16, 768)}, layerwise=True)
    for fmt in ("kohya", "diffusers"):
        save_lora(layers, tmp_path / f"{fmt}.safetensors", format=fmt, family="sd1", tokens=[tok])
        back = load_lora(tmp_path / f"{fmt}.safetensors")
        assert [t.name for t in back.tokens] == ["<dog>"] and back.tokens[0].layerwise
        assert torch.equal(back.tokens[0].embeddings["text_encoder"], tok.embeddings["text_encoder"])


def _kohya(name, parts):
    return {f"lora_unet_{name}.{k}": v for k, v in parts.items()}


def test_lycoris_dense_deltas_match_independent_formulas(tmp_path):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    name = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    # LoHa: dW = (w1a w1b) * (w2a w2b) * alpha / r
    w1a, w1b, w2a, w2b = r(8, 2), r(2, 6), r(8, 2), r(2, 6)
    save_file(_kohya(name, {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                            "alpha": torch.tensor(1.0)}), str(tmp_path / "loha.safetensors"))
    got = load_lora(tmp_path / "loha.safetensors").layers[key]
    want = torch.stack([torch.stack([sum(w1a[i, k] * w1b[k, j] for k in range(2)) * sum(w2a[i, k] * w2b[k, j]
                                                                                        for k in range(2))
                                     for j in range(6)]) for i in range(8)]) * 0.5
    assert isinstance(got, DenseDelta) and torch.allclose(got.weight, want, atol=1e-5)
    # LoKr with w1 full, w2 = w2a w2b: dW[i*4+k, j*3+l] = w1[i,j] * w2[k,l] * alpha / r
    w1, w2a, w2b = r(2, 2), r(4, 1), r(1, 3)
    save_file(_kohya(name, {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(2.0)}),
              str(tmp_path / "lokr.safetensors"))
    got = load_lora(tmp_path / "lokr.safetensors").layers[key].weight
    w2 = w2a @ w2b
    for i in range(2):
        for j in range(2):
            assert torch.allclose(got[i * 4:(i + 1) * 4, j * 3:(j + 1) * 3], w1[i, j] * w2 * 2.0, atol=1e-5)
    # Tucker lora_mid on a 3x3 conv: compare with running the three convs on an impulse basis
    cname, ckey = "down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1"
    down, mid, up = r(2, 5, 1, 1), r(2, 2, 3, 3), r(7, 2, 1, 1)
    save_file(_kohya(cname, {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up,
                             "alpha": torch.tensor(1.0)}), str(tmp_path / "tucker.safetensors"))
    got = load_lora(tmp_path / "tucker.safetensors").layers[ckey].weight
    x = r(1, 5, 9, 9)
    seq = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid,
                                                                  padding=1), up) * 0.5
    assert torch.allclose(torch.nn.functional.conv2d(x, got, padding=1), seq, atol=1e-4)


def test_kohya_locon_and_missing_alpha(tmp_path):
    name = "down_blocks_0_resnets_0_conv1"
    down, up = torch.randn(4, 320, 3, 3), torch.randn(320, 4, 1, 1)
    save_file({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up},
              str(tmp_path / "locon.safetensors"))
    layer = load_lora(tmp_path / "locon.safetensors", family="sd1").layers["unet.down_blocks.0.resnets.0.conv1"]
    assert layer.alpha == 4.0 and layer.is_conv  # no alpha means alpha = rank


def test_sd1_kohya_file_with_ldm_names(tmp_path):
    # A1111's compvis spelling of SD 1.x modules; the single-text-encoder prefix says SD 1.x, not SDXL
    g = torch.Generator().manual_seed(6)
    names = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k":
            ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (320, 768)),
        "lora_unet_output_blocks_11_1_proj_out": ("unet.up_blocks.3.attentions.2.proj_out", (320, 320)),
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2":
            ("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", (1280, 5120)),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": ("text_encoder.text_model.encoder.layers.11.mlp.fc2", (768, 3072)),
    }
    sd = {}
    for name, (_, (o, i)) in names.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(2, i, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g)
    save_file(sd, str(tmp_path / "ldm.safetensors"))
    lora = load_lora(tmp_path / "ldm.safetensors")
    assert lora.family == "sd1"
    assert set(lora.layers) == {key for key, _ in names.values()}


def test_loha_conv_gets_the_real_conv_shape(tmp_path):
    g = torch.Generator().manual_seed(7)
    name, key = "lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1"
    parts = {"hada_w1_a": torch.randn(320, 2, generator=g), "hada_w1_b": torch.randn(2, 320 * 9, generator=g),
             "hada_w2_a": torch.randn(320, 2, generator=g), "hada_w2_b": torch.randn(2, 320 * 9, generator=g)}
    save_file({f"{name}.{k}": v for k, v in parts.items()}, str(tmp_path / "loha.safetensors"),
              metadata={"ss_base_model_version": "sd_v1"})
    got = load_lora(tmp_path / "loha.safetensors").layers[key]
    want = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])  # alpha = r
    assert got.weight.shape == (320, 320, 3, 3) and torch.allclose(got.weight.reshape(320, -1), want, atol=1e-4)


def test_peft_dora_is_refused(tmp_path):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 768), f"{key}.lora_B.weight": torch.randn(320, 2),
               f"{key}.lora_magnitude_vector": torch.randn(320)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} is a DoRA layer"):
        load_lora(tmp_path / "dora.safetensors")


def test_hybrid_sdxl_file_and_wrong_metadata(tmp_path):
    # "diffusers names with kohya prefixes", and metadata claiming SD 1.x (as some merge tools write)
    g = torch.Generator().manual_seed(8)
    sd = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.randn(2, 2048, generator=g),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_up.weight": torch.randn(640, 2, generator=g),
        "lora_te1_text_model_encoder_layers_3_mlp_fc1.lora_down.weight": torch.randn(2, 768, generator=g),
        "lora_te1_text_model_encoder_layers_3_mlp_fc1.lora_up.weight": torch.randn(3072, 2, generator=g),
    }
    save_file(sd, str(tmp_path / "hybrid.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    from loraclr.io import read_lora

    lora, report = read_lora(tmp_path / "hybrid.safetensors")
    assert lora.family == "sdxl"
    assert set(lora.layers) == {"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
                                "text_encoder.text_model.encoder.layers.3.mlp.fc1"}
    assert any(w.startswith("mixed families") and "ss_base_model_version=sd_v1" in w for w in report.warnings)
    assert load_lora(tmp_path / "hybrid.safetensors", family="sdxl").family == "sdxl"
    with pytest.raises(ValueError, match="not a sd1 LoRA"):
        load_lora(tmp_path / "hybrid.safetensors", family="sd1")


def test_sdxl_embeddings_written_in_clip_l_clip_g_layout(tmp_path):
    tok = LearnedToken("<xl>", {"text_encoder": torch.randn(2, 768), "text_encoder_2": torch.randn(2, 1280)})
    (f,) = save_embeddings([tok], tmp_path / "xl.safetensors", format="a1111")
    tensors, meta = _read(f)
    assert set(tensors) == {"clip_l", "clip_g"} and meta["name"] == "<xl>"
    (back,) = load_embeddings(f)
    assert back.name == "<xl>" and torch.equal(back.embeddings["text_encoder_2"], tok.embeddings["text_encoder_2"])


def test_old_diffusers_text_encoder_processor_names(tmp_path):
    base = "text_encoder.text_model.encoder.layers.0.self_attn"
    down, up = torch.randn(2, 768), torch.randn(768, 2)
    save_file({f"{base}.to_q_lora.down.weight": down, f"{base}.to_q_lora.up.weight": up,
               f"{base}.to_out_lora.down.weight": down.clone(), f"{base}.to_out_lora.up.weight": up.clone()},
              str(tmp_path / "old_te.safetensors"))
    layers = load_lora(tmp_path / "old_te.safetensors").layers
    assert set(layers) == {f"{base}.q_proj", f"{base}.out_proj"}
    assert torch.equal(layers[f"{base}.q_proj"].down, down)


def test_writer_accepts_layers_sharing_tensors(tmp_path):
    down, up = torch.randn(2, 768), torch.randn(320, 2)
    keys = [f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.{m}" for m in ("to_k", "to_v")]
    layers = {k: LoraLayer(down, up, 2.0) for k in keys}
    save_lora(layers, tmp_path / "s.safetensors", format="kohya", family="sd1")
    back = load_lora(tmp_path / "s.safetensors").layers
    assert all(torch.equal(back[k].down, down) and torch.equal(back[k].up, up) for k in keys)


def _decaying(m, n, seed=3, tau=12.0):
    """An (m, n) matrix with singular values exp(-k / tau): random orthonormal bases."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / tau)
    return (u * s) @ v.T, s


@pytest.mark.parametrize("shape", [(96, 300), (300, 96), (24, 8, 3, 3)])
def test_factorize_fixed_rank_matches_full_svd(shape):
    """The fixed-rank path (top eigenvectors of the smaller Gram) loses nothing against the optimum, and
    the error it reports is the true one, computed here independently in float64."""
    if len(shape) == 4:
        w2, s = _decaying(shape[0], shape[1] * 9)
        w = w2.reshape(shape)
    else:
        w, s = _decaying(*shape)
    rank = 6
    layer, err = factorize(w, rank=rank)
    assert layer.rank == rank and layer.alpha == rank
    assert layer.up.shape[:2] == (shape[0], rank) and layer.down.shape[1:] == shape[1:]
    optimum = float(s[rank:].double().square().sum().sqrt() / s.double().square().sum().sqrt())  # Eckart-Young
    true = float((w.double() - layer.delta(torch.float64)).norm() / w.double().norm())
    assert err == pytest.approx(true, rel=1e-4)
    assert err == pytest.approx(optimum, rel=1e-3)
    # the split is even: both factors carry sqrt(S)
    torch.testing.assert_close(layer.up.reshape(shape[0], rank).norm(dim=0),
                               layer.down.reshape(rank, -1).norm(dim=1), rtol=1e-4, atol=1e-6)


def test_factorize_energy_still_exact():
    w, s = _decaying(80, 120)
    e = s.double().square()
    want = int((torch.cumsum(e, 0) / e.sum() < 0.9).sum()) + 1  # smallest rank with >= 90 % of the energy
    layer, err = factorize(w, energy=0.9)
    assert layer.rank == want
    assert err == pytest.approx(float(e[want:].sum().sqrt() / e.sum().sqrt()), rel=1e-3)
    layer, _ = factorize(w, rank=want - 2, energy=0.9)  # both given: the smaller rank
    assert layer.rank == want - 2


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_merged_from_records_file_names_and_hashes_not_paths(tmp_path, fmt):
    """A merged LoRA travels: its metadata names its inputs by file name and sha256 (as kohya's model hashes
    identify a file), never by the path where someone keeps them."""
    import hashlib

    layer = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
             LoraLayer(torch.randn(2, 4), torch.randn(4, 2), 2.0)}
    inputs = []
    for i in range(2):
        inputs.append(tmp_path / "private" / f"concept{i}.safetensors")
        inputs[-1].parent.mkdir(exist_ok=True)
        save_lora(layer, inputs[-1], format="kohya", family="sd1", metadata={"n": i})
    save_lora(layer, tmp_path / "merged.safetensors", format=fmt, family="sd1", merged_from=[str(p) for p in inputs])
    meta = load_lora(tmp_path / "merged.safetensors").metadata
    want = [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in inputs]
    assert json.loads(meta["loraclr.merged_from"]) == want
    assert want[0]["sha256"] != want[1]["sha256"]
    if fmt == "kohya":
        assert meta["modelspec.merged_from"] == "concept0.safetensors, concept1.safetensors"
    assert "private" not in json.dumps(meta)


def test_formats_are_one_table_tried_in_order(tmp_path, monkeypatch):
    """The reader picks the format from io.read.FORMATS, first match wins, diffusers takes the rest; a new
    format is one entry there."""
    from loraclr.io import read

    assert [f.name for f in read.FORMATS] == ["edlora", "textual-inversion", "kohya", "diffusers"]
    assert all(f.summary for f in read.FORMATS)
    path = tmp_path / "odd.safetensors"
    save_file({"my_format.delta": torch.ones(2, 3)}, str(path))
    with pytest.raises(ValueError, match="unknown keys"):  # nothing recognises it: diffusers reports the keys
        load_lora(path)

    def read_mine(f):
        if "my_format.delta" not in f.keyed:
            return None
        return "mine", {"unet.down_blocks.0.proj": DenseDelta(f.keyed["my_format.delta"])}, []

    monkeypatch.setattr(read, "FORMATS", (read.LoraFormat("mine", read_mine, "a test format"), *read.FORMATS))
    lora = load_lora(path)
    assert lora.format == "mine" and torch.equal(lora.layers["unet.down_blocks.0.proj"].weight, torch.ones(2, 3))
