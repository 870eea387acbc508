"""Module-name maps between canonical keys, kohya names and the SGM/LDM ("original") UNet layout.

kohya writes a module path with every ``.`` replaced by ``_``; the path is the diffusers one for SD 1.x/2.x
UNets and text encoders, and the SGM/LDM one (``input_blocks_4_1_...``) for SDXL UNets. Turning ``_`` back
into ``.`` cannot be done by string replacement (``to_out_0`` -> ``to_out.0``, ``ff_net_0_proj`` ->
``ff.net.0.proj``), so names are split into segments drawn from the vocabulary of the real diffusers module
trees, and a name that splits two ways is an error. The LDM <-> diffusers block map is derived from the UNet
config (blocks, ``layers_per_block``) and checked against diffusers' own converters in the tests.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from loraclr.lora import split_key

KOHYA_PREFIXES = {
    # family kind -> component -> prefix
    "single_te": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "dual_te": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
_PREFIX_TO_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}

# diffusers ResnetBlock2D child -> LDM ResBlock child
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@functools.cache
def _unet_init_fields() -> frozenset[str]:
    import inspect

    from diffusers import UNet2DConditionModel

    return frozenset(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


def _config_key(cfg: dict[str, Any]) -> str:
    """A hashable key for a UNet config; accepts ``dict(unet.config)`` (private ``_*`` entries dropped)."""
    fields = _unet_init_fields()
    return json.dumps({k: v for k, v in dict(cfg).items() if k in fields}, sort_keys=True, default=list)


def real_unet_config(family: str) -> dict[str, Any]:
    """The UNet config whose module names a family's files use (SD 2.x shares SD 1.x's names)."""
    from loraclr.models import SD15_UNET, SDXL_UNET

    if family == "sdxl":
        return SDXL_UNET
    if family in ("sd1", "sd2"):
        return SD15_UNET
    raise ValueError(f"no UNet layout for family {family!r}; expected sd1, sd2 or sdxl")


@functools.cache
def _unet_module_shapes(cfg_key: str) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape for every module with its own weight, from a meta build of the config."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**json.loads(cfg_key))
    out = {}
    for name, mod in unet.named_modules():
        w = getattr(mod, "weight", None)
        if name and isinstance(w, torch.Tensor) and "weight" in dict(mod.named_parameters(recurse=False)):
            out[name] = tuple(w.shape)
    return out


def unet_module_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return _unet_module_shapes(_config_key(cfg))


def ldm_unet_path(path: str, cfg: dict[str, Any]) -> str:
    """The SGM/LDM module path of a diffusers UNet module path, from the config's block structure.

    ``input_blocks``: 0 is conv_in, then per down block ``layers_per_block`` (resnet, attention) pairs and
    one downsampler; ``output_blocks``: per up block ``layers_per_block + 1`` pairs, the upsampler sits in
    the last one after the resnet (and attention when there is one). The middle block is resnet,
    attention, resnet.
    """
    for top, ldm in _TOP_TO_LDM.items():
        if path == top or path.startswith(top + "."):
            return ldm + path[len(top) :]
    n = int(cfg["layers_per_block"]) if not isinstance(cfg["layers_per_block"], (list, tuple)) else None
    if n is None:
        raise ValueError("per-block layers_per_block has no SGM layout here")
    parts = path.split(".")

    def inner(kind: str, rest: list[str]) -> list[str]:
        if kind == "resnets" and rest and rest[0] in _RESNET_TO_LDM:
            return _RESNET_TO_LDM[rest[0]].split(".") + rest[1:]
        return rest

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv -> input_blocks.k.0.op
            k = (i + 1) * (n + 1)
            rest = ["op"] + parts[5:] if parts[4] == "conv" else parts[4:]
            return ".".join(["input_blocks", str(k), "0", *rest])
        j = int(parts[3])
        k = 1 + i * (n + 1) + j
        sub = {"resnets": "0", "attentions": "1"}[kind]
        return ".".join(["input_blocks", str(k), sub, *inner(kind, parts[4:])])
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        k = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        return ".".join(["middle_block", str(k), *inner(kind, parts[3:])])
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        has_attn = "CrossAttn" in cfg["up_block_types"][i]
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv -> output_blocks.k.(1|2).conv
            k = i * (n + 1) + n
            return ".".join(["output_blocks", str(k), "2" if has_attn else "1", *parts[4:]])
        j = int(parts[3])
        k = i * (n + 1) + j
        sub = {"resnets": "0", "attentions": "1"}[kind]
        return ".".join(["output_blocks", str(k), sub, *inner(kind, parts[4:])])
    raise KeyError(f"unet.{path}: no SGM/LDM counterpart known")


@functools.cache
def _ldm_maps(cfg_key: str) -> tuple[dict[str, str], dict[str, str]]:
    cfg = json.loads(cfg_key)
    to_ldm = {p: ldm_unet_path(p, cfg) for p in _unet_module_shapes(cfg_key)}
    from_ldm = {v: k for k, v in to_ldm.items()}
    assert len(from_ldm) == len(to_ldm), "SGM map is not one-to-one"
    return to_ldm, from_ldm


def ldm_maps(cfg: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(diffusers path -> LDM path, LDM path -> diffusers path) for every weighted module of the UNet."""
    return _ldm_maps(_config_key(cfg))


# --- segment vocabularies ----------------------------------------------------------------------------------


@functools.cache
def _vocab() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """Segment names of diffusers UNet paths, LDM UNet paths and CLIP text-encoder paths.

    Taken from the real SD 1.5 and SDXL module trees (names only, on the meta device).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from loraclr.models import SD15_TEXT

    unet, ldm = set(), set()
    for family in ("sd1", "sdxl"):
        cfg = real_unet_config(family)
        to_ldm, _ = ldm_maps(cfg)
        for p, q in to_ldm.items():
            unet.update(p.split("."))
            ldm.update(q.split("."))
    with torch.device("meta"):
        te = CLIPTextModelWithProjection(CLIPTextConfig(**dict(SD15_TEXT, num_hidden_layers=1)))
    text = set()
    for name, _ in te.named_modules():
        text.update(("text_model." + name if not name.startswith("text_model") and name != "text_projection"
                     else name).split("."))
    digits = re.compile(r"\d+$")
    clean = lambda s: frozenset(x for x in s if x and not digits.match(x))  # noqa: E731
    return clean(unet), clean(ldm), clean(text)


def _segment(name: str, vocab: frozenset[str], known: set[str] | dict | None = None) -> list[str]:
    """Split ``a_b_c`` into dotted segments from ``vocab`` (or integers).

    When several splits exist (``proj_out`` vs ``proj.out``: both ``proj`` and ``out`` are segments of the
    LDM tree), the one naming a module of ``known`` wins, then the one with the fewest segments; a tie
    is an error.
    """
    words = name.split("_")

    @functools.cache
    def parses(i: int) -> list[tuple[str, ...]]:
        if i == len(words):
            return [()]
        out = []
        for j in range(i + 1, len(words) + 1):
            seg = "_".join(words[i:j])
            if seg in vocab or (j == i + 1 and seg.isdigit()):
                out.extend((seg, *rest) for rest in parses(j))
        return out[:16]

    found = parses(0)
    if not found:
        raise KeyError(name)
    if len(found) > 1 and known is not None:
        found = [p for p in found if ".".join(p) in known] or found
    if len(found) > 1:
        fewest = min(len(p) for p in found)
        found = [p for p in found if len(p) == fewest]
    if len(found) > 1:
        raise KeyError(f"{name} (ambiguous: {' or '.join('.'.join(p) for p in found[:2])})")
    return list(found[0])


@functools.cache
def _real_unet_paths() -> frozenset[str]:
    return frozenset(unet_module_shapes(real_unet_config("sd1"))) | frozenset(
        unet_module_shapes(real_unet_config("sdxl")))


def _is_ldm(path_words: str) -> bool:
    return path_words.startswith(("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_",
                                  "out_"))


def kohya_family_kind(family: str) -> str:
    return "dual_te" if family == "sdxl" else "single_te"


def kohya_prefix(component: str, family: str) -> str:
    prefixes = KOHYA_PREFIXES[kohya_family_kind(family)]
    if component not in prefixes:
        raise ValueError(f"a {family} kohya LoRA has no {component}; known components: {sorted(prefixes)}")
    return prefixes[component]


def kohya_name(key: str, family: str, unet_config: dict[str, Any] | None = None) -> str:
    """kohya module name (``lora_unet_...``) of a canonical key. SDXL UNets use SGM names, as A1111 expects."""
    component, path = split_key(key)
    if component == "unet" and family == "sdxl":
        cfg = unet_config or real_unet_config("sdxl")
        to_ldm, _ = ldm_maps(cfg)
        if path not in to_ldm:
            raise KeyError(f"{key}: not a module of this SDXL UNet (config with blocks "
                           f"{cfg.get('block_out_channels')}); pass the matching unet_config")
        path = to_ldm[path]
    return kohya_prefix(component, family) + "_" + path.replace(".", "_")


def canonical_from_kohya(name: str, unet_config: dict[str, Any] | None = None) -> str:
    """Canonical key of a kohya module name; SGM UNet names need the UNet config (default: real SDXL).

    Raises ``KeyError`` naming the module when it is not a module of an SD UNet / CLIP text encoder.
    """
    for prefix in ("lora_unet", "lora_te1", "lora_te2", "lora_te"):
        if name.startswith(prefix + "_"):
            rest = name[len(prefix) + 1 :]
            break
    else:
        raise KeyError(f"{name}: no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)")
    component = _PREFIX_TO_COMPONENT[prefix]
    unet_vocab, ldm_vocab, text_vocab = _vocab()
    if component != "unet":
        return component + "." + ".".join(_segment(rest, text_vocab))
    if _is_ldm(rest):
        cfg = unet_config or real_unet_config("sdxl")
        _, from_ldm = ldm_maps(cfg)
        ldm = ".".join(_segment(rest, ldm_vocab, from_ldm))
        if ldm not in from_ldm:
            raise KeyError(f"{name}: SGM module {ldm} is not in this UNet layout "
                           f"(blocks {cfg.get('block_out_channels')}, layers_per_block {cfg.get('layers_per_block')})")
        return "unet." + from_ldm[ldm]
    return "unet." + ".".join(_segment(rest, unet_vocab, _real_unet_paths()))
