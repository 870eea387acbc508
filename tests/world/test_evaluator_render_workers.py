"""Evaluator training data rendered by a process pool is the one-process data, exactly; device="cpu" is the
default training path."""

from __future__ import annotations

import torch

from loraclr.world import evaluator_training as T


def _same(a: T.WorldData, b: T.WorldData) -> None:
    assert torch.equal(a.images, b.images)
    assert a.captions == b.captions and a.styles == b.styles and a.classes == b.classes
    for f in ("crop_image", "crop_region", "crop_box", "crop_class", "crop_traits"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_workers_render_the_same_data():
    pool = T.identity_pool(20, seed=0)
    near = T.near_misses(list(T.S.CONCEPTS.values()))[:30]
    seq = T.render_data(37, seed=3, pool=pool, near=near, p_near=0.25)
    ticks: list[int] = []
    par = T.render_data(37, seed=3, pool=pool, workers=2, near=near, p_near=0.25, progress=ticks.append)
    _same(seq, par)
    assert len(seq.captions) == 37 and len(seq.crop_image) > 37


def test_explicit_cpu_device_is_the_default_path():
    torch.set_num_threads(1)
    data = T.render_data(24, seed=0, pool=T.identity_pool(6, seed=0), p_concept=0.5)
    data.images_camera = 255 - data.images
    kw = dict(batch=8, input_size=32, lr=3e-3, p_camera=0.5)
    a = T.train_identity(data, 2, **kw)
    b = T.train_identity(data, 2, device="cpu", **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    from loraclr.world.tokenizer import load_tokenizer

    tok = load_tokenizer()
    a = T.train_text_image(data, tok, 2, batch=8, p_camera=0.5)
    b = T.train_text_image(data, tok, 2, batch=8, p_camera=0.5, device=torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert next(b.parameters()).device.type == "cpu"
