"""The evaluators' camera: renders round-tripped through a VAE, used in training and calibration."""

from __future__ import annotations

import pytest
import torch

from loraclr.world import evaluator_training as T


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=4, sample_size=64)


def _renders(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)


def test_roundtrip_keeps_shape_and_is_deterministic(tiny_vae):
    x = _renders()
    a = T.camera_roundtrip(x, tiny_vae, batch=2)  # batches split unevenly on purpose
    b = T.camera_roundtrip(x, tiny_vae, batch=8)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, T.camera_roundtrip(x, tiny_vae, batch=2))  # the latent mean, not a sample
    # the batch size only changes float round-off (kernels block differently), at most one grey level
    assert int((a.int() - b.int()).abs().max()) <= 1
    assert not torch.equal(a, x)  # a random VAE changes the images


def test_pick_images_mixes_renders_and_camera_views():
    x = _renders(64)
    cam = 255 - x
    data = T.WorldData(x, [""] * 64, ["none"] * 64, *([torch.zeros(0)] * 5), [], images_camera=cam)
    rows = torch.arange(64)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(T._pick_images(data, rows, g, 0.0), T.to_float(x))
    assert torch.equal(T._pick_images(data, rows, g, 1.0), T.to_float(cam))
    mixed = T._pick_images(data, rows, g, 0.5)
    from_cam = (mixed == T.to_float(cam)).flatten(1).all(1)
    from_render = (mixed == T.to_float(x)).flatten(1).all(1)
    assert bool((from_cam ^ from_render).all())  # every image is one or the other, whole
    assert 10 < int(from_cam.sum()) < 54
