"""Hooks: LoRA application equals fused weights, inputs recorded once per shared tensor, rows of convs are
their unfolded patches, subsampling is deterministic, and every hook is gone afterwards, also on error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraclr.features.hooks import InputCapture, RowRecorder, module_rows
from loraclr.lora import DenseDelta, LoraLayer
from loraclr.surgery.hooks import apply_layers, cross_attention_modules, layerwise_states


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv3 = nn.Conv2d(4, 2, 3, padding=1, stride=2)

    def forward(self, x):  # x: (B, 3, H, W)
        h = self.conv3(self.conv1(x))
        return self.lin(F.pad(h.flatten(1), (0, 6 - h.flatten(1).shape[1] % 6))[..., :6])


def _toy_layers(gen):
    return {
        "unet.lin": LoraLayer(torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen), 1.0),
        "unet.conv1": LoraLayer(torch.randn(2, 3, 1, 1, generator=gen), torch.randn(4, 2, 1, 1, generator=gen), 4.0),
        "unet.conv3": DenseDelta(torch.randn(2, 4, 3, 3, generator=gen)),
    }


def test_apply_layers_equals_fused_weights_and_restores():
    gen = torch.Generator().manual_seed(0)
    toy = Toy()
    x = torch.randn(2, 3, 6, 6, generator=gen)
    layers = _toy_layers(gen)
    base = toy(x)
    with apply_layers({"unet": toy}, layers, {"unet": 0.7}):
        hooked = toy(x)
    assert _no_hooks(toy)
    assert torch.equal(toy(x), base)  # nothing changed permanently
    fused = Toy()
    fused.load_state_dict(toy.state_dict())
    with torch.no_grad():
        for key, layer in layers.items():
            mod = getattr(fused, key.split(".")[1])
            mod.weight += 0.7 * layer.delta().reshape(mod.weight.shape)
    torch.testing.assert_close(hooked, fused(x), rtol=1e-5, atol=1e-5)
    assert (hooked - base).abs().max() > 1e-2  # the LoRA really changed the output


def test_hooks_removed_on_error():
    toy = Toy()
    layers = _toy_layers(torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="boom"):
        with apply_layers({"unet": toy}, layers), InputCapture({"lin": toy.lin, "conv1": toy.conv1}):
            assert not _no_hooks(toy)
            raise RuntimeError("boom")
    assert _no_hooks(toy)
    # an error inside the forward pass (wrong input shape) also leaves no hooks behind
    with pytest.raises(RuntimeError):
        with apply_layers({"unet": toy}, layers), InputCapture({"lin": toy.lin}):
            toy(torch.randn(1, 5, 6, 6))
    assert _no_hooks(toy)
    # a bad key fails before the block runs, and removes the hooks already installed
    with pytest.raises(KeyError, match="unet.nope"):
        with apply_layers({"unet": toy}, {**layers, "unet.nope": layers["unet.lin"]}):
            pass
    assert _no_hooks(toy)


def test_conv_rows_are_unfolded_patches():
    gen = torch.Generator().manual_seed(2)
    toy = Toy()
    for conv in (toy.conv1, toy.conv3):
        x = torch.randn(2, conv.in_channels, 7, 7, generator=gen)
        X = module_rows(conv, x)  # (B*L, in*kh*kw)
        y = conv(x) - conv.bias[None, :, None, None]  # bias excluded
        expected = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
        torch.testing.assert_close(X @ conv.weight.reshape(conv.out_channels, -1).T, expected, rtol=1e-5, atol=1e-5)


def test_shared_qkv_inputs_recorded_once(tiny_sd1):
    attn = tiny_sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    cross = tiny_sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    mods = {"a1.q": attn.to_q, "a1.k": attn.to_k, "a1.v": attn.to_v,
            "a2.q": cross.to_q, "a2.k": cross.to_k, "a2.v": cross.to_v}
    h = torch.randn(1, 4, attn.to_q.in_features)
    e = torch.randn(1, 3, cross.to_k.in_features)
    with torch.no_grad(), InputCapture(mods) as cap:
        attn(h)
        cross(h, encoder_hidden_states=e)
    # attn2.to_q sees the same object as attn1 here, but is no sibling: recorded on its own
    assert cap.alias == {"a1.q": "a1.q", "a1.k": "a1.q", "a1.v": "a1.q", "a2.q": "a2.q", "a2.k": "a2.k",
                         "a2.v": "a2.k"}
    assert sorted(cap.recorders) == ["a1.q", "a2.k", "a2.q"]  # three recordings for six layers
    torch.testing.assert_close(cap.rows("a1.v"), h[0])
    torch.testing.assert_close(cap.rows("a2.v"), e[0])
    assert _no_hooks(tiny_sd1.unet)


def test_row_recorder_cap_determinism_and_gram():
    gen = torch.Generator().manual_seed(3)
    calls = [torch.randn(50, 4, generator=gen) for _ in range(4)]
    a, b = RowRecorder(cap=40, expected_calls=4, seed=5, gram=True), RowRecorder(cap=40, expected_calls=4, seed=5)
    for c in calls:
        a.add(c)
        b.add(c)
    Xa = a.rows()
    assert Xa.shape == (40, 4)
    assert torch.equal(Xa, b.rows())  # same seed, same positions: blocks of different concepts align
    full = torch.cat(calls)
    torch.testing.assert_close(a.gram, full.T @ full)  # statistics over all 200 rows, not the subsample
    assert a.n_rows == 200
    # every kept row is one of the inputs
    assert all(((full - r).abs().sum(1) == 0).any() for r in Xa)


def test_layerwise_states_reach_each_cross_attention_layer(tiny_sd1):
    unet = tiny_sd1.unet
    layers = cross_attention_modules(unet)
    assert len(layers) == 7  # derived from the model: 2 down + 1 mid + 4 up transformer blocks
    assert [n.split(".")[0] for n, _ in layers] == ["down_blocks"] * 2 + ["mid_block"] + ["up_blocks"] * 4
    dim = unet.config.cross_attention_dim
    states = [torch.full((1, 5, dim), float(i)) for i in range(len(layers))]
    seen = {}

    def spy(name):
        def hook(mod, args, kwargs):
            seen[name] = kwargs["encoder_hidden_states"]
        return hook

    shared = torch.zeros(2, 5, dim)  # CFG batch: [negative, positive]
    with torch.no_grad(), layerwise_states(unet, states):
        # pre-hooks run in registration order: the spies, registered last, see what attention receives
        handles = [m.register_forward_pre_hook(spy(n), with_kwargs=True) for n, m in layers]
        try:
            unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=shared)
        finally:
            for h in handles:
                h.remove()
    for i, (n, _) in enumerate(layers):
        assert torch.equal(seen[n][0], torch.zeros(5, dim))  # the negative half is kept
        assert torch.equal(seen[n][1], torch.full((5, dim), float(i)))  # layer i gets its own states
    assert _no_hooks(unet)
    with pytest.raises(ValueError, match="3 layer-wise states for 7"):
        with layerwise_states(unet, states[:3]):
            pass


def test_generation_and_training_do_not_load_feature_collection():
    """Model surgery (tokens, hooks) lives apart from feature collection: drawing or training loads none of it."""
    import subprocess
    import sys

    code = ("import sys, loraclr.pipeline, loraclr.training.trainer, loraclr.surgery.hooks, loraclr.surgery.tokens; "
            "print(sorted(m for m in sys.modules if m.startswith('loraclr.features')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
