"""Stable Diffusion model shapes: real configs (SD 1.5, SDXL), tiny test configs, and module lookup.

The real configs are written out here so that real-shaped models can be built without a model hub, on the
``meta`` device (names and shapes only, for format tests) or on the CPU with random weights (benchmarks).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from loraclr.lora import split_key

# --- real configs -----------------------------------------------------------------------------------------

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

SDXL_TEXT = SD15_TEXT  # CLIP ViT-L/14, same as SD 1.x
SDXL_TEXT_2 = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)

SDXL_VAE = dict(SD15_VAE, sample_size=1024)

# --- tiny configs (tests) ---------------------------------------------------------------------------------

TINY_SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)

TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)

TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,  # = hidden size of text_encoder + text_encoder_2
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 time ids * dim + pooled text_encoder_2 output
    norm_num_groups=8,
)

TINY_TEXT_2 = dict(TINY_TEXT, hidden_size=32, projection_dim=32, hidden_act="gelu")

CONFIGS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("sd1", "real"): {"unet": SD15_UNET, "text_encoder": SD15_TEXT, "vae": SD15_VAE},
    ("sdxl", "real"): {
        "unet": SDXL_UNET,
        "text_encoder": SDXL_TEXT,
        "text_encoder_2": SDXL_TEXT_2,
        "vae": SDXL_VAE,
    },
    ("sd1", "tiny"): {"unet": TINY_SD1_UNET, "text_encoder": TINY_TEXT, "vae": TINY_VAE},
    ("sdxl", "tiny"): {
        "unet": TINY_SDXL_UNET,
        "text_encoder": TINY_TEXT,
        "text_encoder_2": TINY_TEXT_2,
        "vae": TINY_VAE,
    },
}


def build_components(
    family: str = "sd1",
    size: str = "tiny",
    device: str | torch.device = "cpu",
    seed: int = 0,
    with_vae: bool = True,
) -> dict[str, Any]:
    """Build the components of an SD1 or SDXL pipeline from a config, with random weights.

    ``device="meta"`` builds only names and shapes (instant, no memory), for key-layout tests.
    Returns a dict usable as ``StableDiffusionPipeline(**components)`` /
    ``StableDiffusionXLPipeline(**components)`` (tokenizers and scheduler included).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraclr.world.tokenizer import load_tokenizer

    if (family, size) not in CONFIGS:
        raise ValueError(f"no config for family={family!r} size={size!r}; known: {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[(family, size)])
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        out: dict[str, Any] = {"unet": unet, "text_encoder": text_encoder}
        if "text_encoder_2" in cfg:
            out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        out["vae"] = AutoencoderKL(**cfg["vae"]) if with_vae else None
    tokenizer = load_tokenizer()
    out["tokenizer"] = tokenizer
    if family == "sdxl":
        out["tokenizer_2"] = load_tokenizer()
    out["scheduler"] = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )
    if family == "sd1":
        out.update(safety_checker=None, feature_extractor=None, image_encoder=None)
    else:
        out.update(image_encoder=None, feature_extractor=None)
    return out


def build_pipeline(family: str = "sd1", size: str = "tiny", device: str = "cpu", seed: int = 0):
    """A diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) from a config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps = build_components(family, size, device, seed)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    if cls is StableDiffusionPipeline:
        return cls(**comps, requires_safety_checker=False)
    return cls(**comps)


# --- module lookup ---------------------------------------------------------------------------------------


def _strip_text_model(path: str) -> str:
    return path[len("text_model.") :] if path.startswith("text_model.") else path


def find_module(components: Any, key: str) -> nn.Module:
    """The live module for a canonical key, in a pipeline or a dict of components.

    Text-encoder keys carry ``text_model.``; transformers v5 models may not: both are tried.
    Raises ``KeyError`` naming the key when the module does not exist.
    """
    component, path = split_key(key)
    root = components.get(component) if isinstance(components, dict) else getattr(components, component, None)
    if root is None:
        raise KeyError(f"{key}: the model has no component {component!r}")
    # get_submodule walks the dotted path (O(depth)); building dict(named_modules()) per call cost ~5 ms on
    # the SD 1.5 UNet, i.e. ~16 s of a 12-concept merge's load phase (3168 lookups).
    for candidate in (path, _strip_text_model(path), "text_model." + path):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    raise KeyError(f"{key}: no module {path!r} in {component}")


def canonical_module_name(component: str, name: str) -> str:
    """Canonical key for a live module name (adds ``text_model.`` for text encoders)."""
    if component.startswith("text_encoder") and not name.startswith("text_model."):
        name = "text_model." + name
    return f"{component}.{name}"


def default_lora_targets(components: Any, include_convs: bool = False) -> dict[str, nn.Module]:
    """The modules kohya's default LoRA network targets, by canonical key.

    UNet: every Linear and 1x1 Conv2d inside a ``Transformer2DModel`` (attention q/k/v/out, feed-forward,
    proj_in/proj_out); with ``include_convs`` also ResNet / down- / up-sampler 3x3 convs (LoCon).
    Text encoders: every Linear inside ``CLIPAttention`` and ``CLIPMLP``.
    SD 1.5 gives 192 UNet + 72 text-encoder modules; SDXL 722 + 264.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    targets: dict[str, nn.Module] = {}
    get = components.get if isinstance(components, dict) else lambda c: getattr(components, c, None)
    unet = get("unet")
    if unet is not None:
        for parent_name, parent in unet.named_modules():
            in_transformer = isinstance(parent, Transformer2DModel)
            in_resnet = include_convs and type(parent).__name__ in ("ResnetBlock2D", "Downsample2D", "Upsample2D")
            if not (in_transformer or in_resnet):
                continue
            for name, mod in parent.named_modules():
                full = f"{parent_name}.{name}" if name else parent_name
                if isinstance(mod, nn.Linear) and in_transformer:
                    targets[f"unet.{full}"] = mod
                elif isinstance(mod, nn.Conv2d) and (in_resnet or mod.kernel_size == (1, 1)):
                    targets[f"unet.{full}"] = mod
    for component in ("text_encoder", "text_encoder_2"):
        te = get(component)
        if te is None:
            continue
        for parent_name, parent in te.named_modules():
            if type(parent).__name__ not in ("CLIPAttention", "CLIPMLP", "CLIPSdpaAttention"):
                continue
            for name, mod in parent.named_children():
                if isinstance(mod, nn.Linear):
                    targets[canonical_module_name(component, f"{parent_name}.{name}")] = mod
    return targets
