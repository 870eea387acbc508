"""Evaluator files: fp16 round trip, config in the header, loud errors; training lowers the losses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from loraclr.evaluate.nets import IdentityNet, TextImageNet, load_net, save_net
from loraclr.world import evaluator_training as T


def test_save_load_round_trip(tmp_path):
    net = IdentityNet(32, widths=(8, 16), dim=8, traits={"shape": 4}).eval()
    for p in net.parameters():  # values that fp16 holds exactly
        p.data = p.data.half().float()
    path = save_net(net, tmp_path / "id.safetensors", {"steps": 3})
    back, extra = load_net(path)
    assert extra == {"steps": 3} and back.input_size == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), net(x), atol=1e-6)
    clip = TextImageNet([320, 736, 49407], widths=(8, 16), width=8, layers=1, heads=2, dim=8).eval()
    back, _ = load_net(save_net(clip, tmp_path / "clip.safetensors"))
    assert back.vocab_ids.tolist() == [320, 736, 49407]
    # unknown CLIP ids (a trigger word) map to UNK=1, known ones to 2.., padding to 0
    assert back.compact([[320, 999, 49407], [736]]).tolist() == [[2, 1, 4], [3, 0, 0]]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_evaluators"):
        load_net(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="loraclr.config"):
        load_net(tmp_path / "plain.safetensors")


@pytest.mark.slow
def test_short_training_lowers_losses():
    torch.set_num_threads(1)
    pool = T.identity_pool(8, seed=0)
    data = T.render_data(48, seed=0, pool=pool, p_concept=0.5)
    losses = {"id": [], "clip": []}
    T.train_identity(data, 12, batch=32, input_size=32, lr=3e-3, callback=lambda s, v: losses["id"].append(v))
    from loraclr.world.tokenizer import load_tokenizer

    T.train_text_image(data, load_tokenizer(), 12, batch=24, lr=3e-3,
                       callback=lambda s, v: losses["clip"].append(v))
    for k, v in losses.items():
        assert sum(v[-3:]) / 3 < sum(v[:3]) / 3, (k, v)
