"""The miniature Stable Diffusion of the built-in world: configs, building, saving and loading.

The base model is an ordinary diffusers ``StableDiffusionPipeline`` folder (``assets/mini-sd``), built from
the same classes as SD 1.5 at a CPU-friendly size: 64x64 RGB images <-> 16x16x4 latents, a small
``CLIPTextModel`` with the real CLIP tokenizer, and a ``UNet2DConditionModel`` with cross-attention
(attn1 / attn2 / ff / proj_in / proj_out, so LoRAs on it look like LoRAs on SD).

Resuming training: the committed folder (fp16) plus ``training_state.json`` beside it IS the checkpoint.
Resuming reloads those weights in fp32 and restarts the optimizer with a short warm-up (see
``loraclr.world.training``).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from loraclr.world.tokenizer import load_tokenizer, tokenizer_folder

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
BASE_MODEL_DIR = ASSETS / "mini-sd"
STATE_FILE = "training_state.json"

MINI_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,  # 64 -> 32 -> 16
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)

MINI_TEXT = dict(
    vocab_size=49408,  # the real CLIP vocabulary: 49408 x hidden is most of the encoder's size
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=128,
)

MINI_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),  # 16, 8, 4
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 160),
    layers_per_block=1,
    cross_attention_dim=128,  # = MINI_TEXT hidden_size
    attention_head_dim=4,  # diffusers' name for the number of heads in SD-style configs
    norm_num_groups=16,
)

# SD 1.5's noise schedule; DDIM for sampling (as SD 1.5 ships it), DDPM for training.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# A throw-away model with the same structure, for tests of the folder code.
TINY_WORLD = dict(
    vae=dict(MINI_VAE, block_out_channels=(8, 8, 8), norm_num_groups=4),
    text_encoder=dict(MINI_TEXT, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, projection_dim=16),
    unet=dict(MINI_UNET, block_out_channels=(16, 16, 16), cross_attention_dim=16, attention_head_dim=2,
              norm_num_groups=8),
)
MINI_WORLD = dict(vae=MINI_VAE, text_encoder=MINI_TEXT, unet=MINI_UNET)


def build_vae(size: str = "mini", seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**_configs(size)["vae"])


def build_text_and_unet(size: str = "mini", seed: int = 0):
    """A fresh text encoder and UNet with random weights (seeded)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = _configs(size)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    return text_encoder, unet


def _configs(size: str) -> dict[str, dict[str, Any]]:
    if size == "mini":
        return copy.deepcopy(MINI_WORLD)
    if size == "tiny":
        return copy.deepcopy(TINY_WORLD)
    raise ValueError(f"unknown world model size {size!r}; use 'mini' or 'tiny'")


def make_scheduler(kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler(**SCHEDULER)
    if kind == "ddpm":
        return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"})
    raise ValueError(f"unknown scheduler kind {kind!r}; use 'ddim' or 'ddpm'")


def assemble_pipeline(vae, text_encoder, unet, scheduler=None):
    """A StableDiffusionPipeline from the world's parts (real CLIP tokenizer, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
        scheduler=scheduler or make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline_folder(vae, text_encoder, unet, folder: str | Path, state: dict | None = None,
                         dtype: torch.dtype = torch.float16) -> Path:
    """Write a diffusers pipeline folder (weights in ``dtype`` safetensors) and replace ``folder`` with it.

    The folder is written beside the target under a temporary name and renamed into place, so a reader (or
    a crash) never sees a half-written model. ``state`` is written as ``training_state.json`` inside it.
    The tokenizer is copied from ``TOKENIZER_DIR`` (the built-in model's, vocab.json + merges.txt, as SD
    ships it), before ``folder`` is replaced, so writing the built-in model itself keeps it.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{int(time.time() * 1000)}"
    parts = [copy.deepcopy(m) for m in (vae, text_encoder, unet)]
    for m in parts:
        # cast tensor by tensor: ModelMixin.to(dtype) warns about keep-in-fp32 modules these models lack
        for t in list(m.parameters()) + list(m.buffers()):
            t.data = t.data.to("cpu", dtype) if t.is_floating_point() else t.data.to("cpu")
        for p in m.parameters():
            if not torch.isfinite(p).all():
                raise ValueError(f"{folder}: non-finite weights in {type(m).__name__}; not saving")
    pipe = assemble_pipeline(*parts)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
    shutil.copytree(tokenizer_folder(), tmp / "tokenizer")  # a clear error when the committed one is missing
    if state is not None:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    old = folder.parent / f".{folder.name}.old-{int(time.time() * 1000)}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_training_state(folder: str | Path) -> dict | None:
    path = Path(folder) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def base_model_path() -> Path:
    """The built-in miniature SD folder. Raises FileNotFoundError when it has not been built yet."""
    if not (BASE_MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the miniature world is not built yet: {BASE_MODEL_DIR} has no model_index.json; run "
            "`python scripts/train_world.py all` (see scripts/README.md) or pull the committed folder"
        )
    return BASE_MODEL_DIR


def load_base_pipeline(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """The built-in miniature SD as a stock ``StableDiffusionPipeline`` (progress bar off)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else base_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
