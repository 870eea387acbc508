"""Readers: any LoRA / embedding file -> :class:`loraclr.lora.LoraSet`.

Formats: kohya/A1111 (SD1 diffusers-style names, SDXL SGM names, hybrids, LoCon, LyCORIS), diffusers/PEFT
(and the legacy attention-processor, ``.lora.down``, ``lora_linear_layer`` and ``base_model.model.``
variants), Mix-of-Show ED-LoRA ``.pth``, textual inversions: one entry each in :data:`FORMATS`, tried in
order. Converters are loud: every key is consumed or reported, alpha always travels with its factors, and
pickles are loaded weights-only after an opt-in.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loraclr.io import keymap, lycoris
from loraclr.io.safe import (
    PICKLE_SUFFIXES,
    check_finite,
    is_safetensors,
    read_json,
    read_pickle,
    read_safetensors,
)
from loraclr.lora import DenseDelta, LearnedToken, LoraLayer, LoraSet, split_key
from loraclr.models import canonical_module_name, find_module

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "diff", *(
    lycoris.LOHA), *lycoris.LOKR}
DIR_CANDIDATES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "learned_embeds.safetensors",
                  "pytorch_lora_weights.bin", "adapter_model.bin", "learned_embeds.bin")

# diffusers-style suffixes -> role; order matters (longest first)
_DIFFUSERS_SUFFIX = [
    (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), "linear_layer"),
    (re.compile(r"_lora\.(down|up)\.weight$"), "processor"),
    (re.compile(r"\.lora\.(down|up)\.weight$"), "lora_dot"),
    (re.compile(r"\.lora_(down|up)\.weight$"), "kohya_suffix"),
    (re.compile(r"\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"), "peft"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.(lora_magnitude_vector|dora_scale)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"), "dora"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.bias$"), "bias"),
]


_TE_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class ReadReport:
    """What a reader saw besides the layers: detection evidence and problems worth a warning."""

    warnings: list[str] = field(default_factory=list)
    evidence: list[tuple[str, str]] = field(default_factory=list)  # (family, why)
    unknown_keys: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)


# --- raw loading ---------------------------------------------------------------------------------------------


def _resolve_path(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """A file to read, and a PEFT adapter_config.json beside it if the input is a folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        for name in DIR_CANDIDATES:
            if (path / name).is_file():
                cfg = path / "adapter_config.json"
                return path / name, (read_json(cfg) if cfg.is_file() else None)
        raise FileNotFoundError(f"{path}: folder holds none of {', '.join(DIR_CANDIDATES)}")
    cfg = path.parent / "adapter_config.json"
    return path, (read_json(cfg) if path.name.startswith("adapter_model") and cfg.is_file() else None)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_raw(path: Path, allow_pickle: bool) -> tuple[Any, dict[str, str], bool]:
    """(object, string metadata, is_pickle). Safetensors are recognised by content, not by suffix."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; download it again")
    if is_safetensors(path):
        tensors, meta = read_safetensors(path)
        return tensors, meta, False
    if zipfile.is_zipfile(path) or path.suffix.lower() in PICKLE_SUFFIXES:
        obj = read_pickle(path, allow_pickle)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; not a LoRA file")
        return obj, {}, True
    raise ValueError(
        f"{path}: neither a safetensors file nor a torch pickle (first bytes {path.read_bytes()[:8]!r}); "
        "the file is corrupt or not a LoRA"
    )


# --- family detection -----------------------------------------------------------------------------------------

_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _metadata_evidence(meta: dict[str, str]) -> list[tuple[str, str]]:
    ev = []
    v = meta.get("ss_base_model_version", "")
    if v.startswith("sdxl"):
        ev.append(("sdxl", f"ss_base_model_version={v}"))
    elif v.startswith("sd_v2"):
        ev.append(("sd2", f"ss_base_model_version={v}"))
    elif v.startswith("sd_v1"):
        ev.append(("sd1", f"ss_base_model_version={v}"))
    if meta.get("ss_v2") == "True" and not v:
        ev.append(("sd2", "ss_v2=True"))
    arch = meta.get("modelspec.architecture", "")
    for needle, fam in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if arch.startswith(needle):
            ev.append((fam, f"modelspec.architecture={arch}"))
            break
    return ev


def _layer_evidence(layers: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    ev = []
    if any(k.startswith("text_encoder_2.") for k in layers):
        ev.append(("sdxl", "has a second text encoder"))
    for key, shape in shapes.items():
        if key.startswith("unet.") and key.endswith(("attn2.to_k", "attn2.to_v")) and shape[1] in _CROSS_DIM:
            ev.append((_CROSS_DIM[shape[1]], f"{key} reads {shape[1]}-wide text features"))
            break
    for key, shape in shapes.items():
        if key.startswith("text_encoder.") and key.endswith("q_proj") and shape[1] == 1024:
            ev.append(("sd2", f"{key} is 1024 wide (OpenCLIP ViT-H)"))
            break
    return ev


def _is_metadata(why: str) -> bool:
    return why.startswith(("ss_", "modelspec."))


def _deciding(evidence: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The evidence the family goes by: shapes and keys, else metadata (merge tools are known to write wrong
    metadata)."""
    return [(f, why) for f, why in evidence if not _is_metadata(why)] or evidence


def decide_family(evidence: list[tuple[str, str]], source: str, family: str | None, report: ReadReport) -> str:
    """Pick the family from :func:`_deciding` evidence; ``family`` given is checked against it."""
    fams = {f for f, _ in evidence}
    if len(fams) > 1:
        report.warnings.append("mixed families: " + "; ".join(f"{f} ({why})" for f, why in evidence))
    deciding = _deciding(evidence)
    detected = deciding[0][0] if deciding else "unknown"
    if family is not None:
        if family not in ("sd1", "sd2", "sdxl"):
            raise ValueError(f"{source}: unknown family {family!r}; expected sd1, sd2 or sdxl")
        against = [(f, why) for f, why in deciding if f != family]
        if against:
            raise ValueError(
                f"{source}: the file is not a {family} LoRA: " + "; ".join(f"{why} -> {f}" for f, why in against)
                + f". Use a LoRA trained for {family}, or a {detected} base model"
            )
        return family
    return detected


def _family_mismatch(evidence: list[tuple[str, str]], family: str | None) -> str | None:
    """'the file is an sdxl LoRA (why) but the base model is sd1: ...' when the file says it is for another
    family than the base model's (``family``), else None."""
    deciding = _deciding(evidence)
    if family is None or not deciding or deciding[0][0] == family:
        return None
    detected, why = deciding[0]
    return (f"the file is an {detected} LoRA ({why}) but the base model is {family}: use a LoRA trained for "
            f"{family}, or an {detected} base model")


def _unknown_keys_hint(evidence: list[tuple[str, str]]) -> str:
    deciding = _deciding(evidence)
    if not deciding:
        return "Is this a LoRA for Stable Diffusion 1.x/2.x/XL?"
    detected, why = deciding[0]
    return f"The file is an {detected} LoRA ({why}); loraclr does not read these modules or layer types"


# --- per-format parsers ---------------------------------------------------------------------------------------


def _make_layer(key: str, parts: dict[str, Tensor], source: str, base: Any = None) -> LoraLayer | DenseDelta:
    """One module's tensors (suffix -> tensor) -> a canonical layer; raises naming the key on bad shapes.

    DoRA layers need the base weight (``base``: a pipeline or components dict) and become exact dense deltas.
    """
    names = set(parts)
    if "dora_scale" in names:
        if base is None:
            raise ValueError(
                f"{source}: {key} is a DoRA layer (dora_scale): its delta depends on the base weight, which a "
                "LoRA file does not hold; refused rather than silently dropping the magnitude (as diffusers "
                "does). Load it with base= (the base model) to apply it exactly"
            )
        inner = _make_layer(key, {k: v for k, v in parts.items() if k != "dora_scale"}, source)
        try:
            w0 = find_module(base, key).weight.detach()
        except KeyError as e:
            raise ValueError(f"{source}: {key}: DoRA layer for a module the base model lacks ({e.args[0]})") from e
        if w0.device.type == "meta":
            raise ValueError(f"{source}: {key}: DoRA needs real base weights, the base model is on the meta device")
        try:
            return DenseDelta(lycoris.dora_delta(w0, inner.delta(), parts["dora_scale"]))
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{source}: {key}: {e}") from e
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise ValueError(f"{source}: {key}.alpha has shape {tuple(alpha.shape)}; expected one number")
    if names & set(lycoris.LOHA):
        return DenseDelta(lycoris.loha_delta(parts))
    if names & set(lycoris.LOKR):
        return DenseDelta(lycoris.lokr_delta(parts))
    if "diff" in names:
        return DenseDelta(parts["diff"])
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise ValueError(f"{source}: {key} has no {missing} weight (found {sorted(names)}); the file is incomplete")
    if down.dim() not in (2, 4) or up.dim() != down.dim() or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise ValueError(
            f"{source}: {key}: factor shapes down {tuple(down.shape)} / up {tuple(up.shape)} are not a LoRA pair"
        )
    if "lora_mid.weight" in names:
        return DenseDelta(lycoris.tucker_delta(down, parts["lora_mid.weight"], up, None if alpha is None else
                                               float(alpha)))
    if down.shape[0] != up.shape[1]:
        raise ValueError(
            f"{source}: {key}: shape mismatch, lora_down {tuple(down.shape)} has rank {down.shape[0]} but lora_up "
            f"{tuple(up.shape)} has rank {up.shape[1]}; the file is corrupt"
        )
    a = float(alpha) if alpha is not None else float(down.shape[0])
    return LoraLayer(down=down, up=up, alpha=a)


def parse_kohya(sd: dict[str, Tensor], source: str, unet_config: dict | None, strict: bool,
                report: ReadReport, base: Any = None) -> dict[str, LoraLayer | DenseDelta]:
    groups: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        if suffix not in _KOHYA_SUFFIXES:
            report.unknown_keys.append(k)
            continue
        groups.setdefault(name, {})[suffix] = v
    layers: dict[str, LoraLayer | DenseDelta] = {}
    for name, parts in groups.items():
        try:
            key = keymap.canonical_from_kohya(name, unet_config)
        except KeyError as e:
            report.unknown_keys.extend(f"{name}.{s}" for s in parts)
            log.debug("unknown kohya module %s", e)
            continue
        if key in layers:
            raise ValueError(f"{source}: {name} and another module both map to {key} (mixed SGM and diffusers "
                             "names for the same layer); the file is ambiguous")
        layers[key] = _make_layer(key, parts, source, base)
    return layers


def _diffusers_split(key: str) -> tuple[str, str, str] | None:
    """(module path with component, role, down|up|alpha|...) or None for an unknown key."""
    for pat, style in _DIFFUSERS_SUFFIX:
        m = pat.search(key)
        if not m:
            continue
        path = key[: m.start()]
        if style in ("alpha", "dora", "bias"):
            return path, style, style
        which = m.group(1)
        which = {"A": "down", "B": "up"}.get(which, which)
        if style == "processor":
            # attention-processor layout: attn1.processor.to_q_lora.down -> attn1.to_q; to_out_lora -> to_out.0
            path = path.replace(".processor.", ".")
            head, _, leaf = path.rpartition(".")
            if head.endswith("self_attn") and leaf in _TE_PROCESSOR:
                # old diffusers text-encoder LoRAs used the UNet processor names on CLIP attention
                path = f"{head}.{_TE_PROCESSOR[leaf]}"
            elif leaf == "to_out":
                path = path + ".0"
        return path, style, which
    return None


def _component_path(path: str, default_component: str | None) -> tuple[str, str]:
    for prefix in ("base_model.model.", "model."):
        if path.startswith(prefix) and default_component is None:
            path = path[len(prefix) :]
    for comp in ("text_encoder_2", "text_encoder", "unet"):
        if path.startswith(comp + "."):
            return comp, path[len(comp) + 1 :]
    if default_component is not None:
        return default_component, path
    return ("text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"), path


def _valid_path(component: str, path: str) -> bool:
    unet_vocab, _, text_vocab = keymap._vocab()
    vocab = unet_vocab if component == "unet" else text_vocab
    return all(s.isdigit() or s in vocab for s in path.split("."))


def _alpha_config(meta: dict[str, str], adapter_cfg: dict | None) -> dict[str, dict[str, Any]]:
    """component -> PEFT LoraConfig kwargs (r, lora_alpha, alpha_pattern, rank_pattern)."""
    out: dict[str, dict[str, Any]] = {}
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"unreadable lora_adapter_metadata ({e})") from e
        for k, v in flat.items():
            comp, _, field_ = k.partition(".")
            out.setdefault(comp, {})[field_] = v
    elif adapter_cfg:
        out["*"] = adapter_cfg
    return out


def _pattern_value(patterns: dict[str, Any], path: str) -> Any:
    # PEFT matches a pattern key as a suffix of the module name on a '.' boundary.
    for pat, v in (patterns or {}).items():
        p = pat.lstrip("^")
        if re.fullmatch(rf"(.*\.)?({p})", path) or re.fullmatch(rf"(.*\.)?({p})", "text_model." + path):
            return v
    return None


def parse_diffusers(sd: dict[str, Tensor], source: str, meta: dict[str, str], adapter_cfg: dict | None,
                    default_component: str | None, report: ReadReport,
                    base: Any = None) -> tuple[dict[str, Any], set[str]]:
    groups: dict[str, dict[str, Tensor]] = {}
    styles: set[str] = set()
    for k, v in sd.items():
        split = _diffusers_split(k)
        if split is None:
            report.unknown_keys.append(k)
            continue
        path, style, which = split
        comp, mpath = _component_path(path, default_component)
        if not _valid_path(comp, mpath):
            report.unknown_keys.append(k)
            continue
        key = canonical_module_name(comp, mpath) if comp != "unet" else f"unet.{mpath}"
        if key.endswith("text_model.text_projection"):
            key = key.replace("text_model.text_projection", "text_projection")
        if style == "dora":
            which = "dora_scale"
        elif style == "bias":
            raise ValueError(f"{source}: {k}: LoRA biases (lora_B.bias) are not supported; the layer {key} would "
                             "be applied without its bias offset")
        elif style != "alpha":
            styles.add(style)
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight"}.get(which, which)
        groups.setdefault(key, {})[suffix] = v
    cfgs = _alpha_config(meta, adapter_cfg)
    layers: dict[str, Any] = {}
    for key, parts in groups.items():
        if "alpha" not in parts and "lora_down.weight" in parts:
            comp, path = split_key(key)
            cfg = cfgs.get(comp) or cfgs.get("*")
            if cfg:
                alpha = _pattern_value(cfg.get("alpha_pattern"), path)
                if alpha is None:
                    alpha = cfg.get("lora_alpha")
                if alpha is not None:
                    parts["alpha"] = torch.tensor(float(alpha))
        layers[key] = _make_layer(key, parts, source, base)
    return layers, styles


_TI_KEYS = ({"emb_params"}, {"clip_l", "clip_g"}, {"clip_l"}, {"clip_g"})


def _as_ti(obj: dict[str, Any], path: Path) -> list[LearnedToken] | None:
    """Learned tokens if ``obj`` is a textual-inversion file, else None."""
    name = path.stem
    if "string_to_param" in obj:  # A1111 .pt
        params = obj["string_to_param"]
        emb = next(iter(params.values()))
        return [LearnedToken(name, {"text_encoder": emb.reshape(-1, emb.shape[-1])})]
    keys = set(obj)
    if keys in _TI_KEYS:
        if keys == {"emb_params"}:
            emb = obj["emb_params"]
            return [LearnedToken(name, {"text_encoder": emb.reshape(-1, emb.shape[-1])})]
        embs = {}
        if "clip_l" in obj:
            embs["text_encoder"] = obj["clip_l"]
        if "clip_g" in obj:
            embs["text_encoder_2"] = obj["clip_g"]
        return [LearnedToken(name, embs)]
    if obj and all(isinstance(v, Tensor) and v.dim() in (1, 2) and "." not in k and not k.startswith(KOHYA_PREFIXES)
                   for k, v in obj.items()):
        # diffusers learned_embeds: {"<tok>": (dim,) or (n, dim)}
        return [LearnedToken(k, {"text_encoder": v.reshape(-1, v.shape[-1])}) for k, v in obj.items()]
    return None


def _is_edlora(obj: dict[str, Any]) -> bool:
    p = obj.get("params")
    return isinstance(p, dict) and ("new_concept_embedding" in p or "unet" in p or "text_encoder" in p)


# --- the format table -----------------------------------------------------------------------------------------


@dataclass
class _OpenedFile:
    """One opened file as every format's reader sees it (see :data:`FORMATS`)."""

    file: Path
    source: str
    obj: Any  # what the file holds: a pickle's object, or safetensors' {key: tensor}
    tensors: dict[str, Tensor]  # every tensor of obj, by its flattened key
    keyed: dict[str, Any]  # the key -> value mapping the LoRA formats read (a pickle's state_dict if it has one)
    meta: dict[str, str]
    is_pickle: bool
    adapter_cfg: dict | None  # a PEFT adapter_config.json beside the file
    family: str | None
    unet_config: dict | None
    strict: bool
    report: ReadReport
    base: Any


# (format name, layers by canonical key, learned tokens)
Parsed = tuple[str, dict[str, Any], list[LearnedToken]]


@dataclass(frozen=True)
class LoraFormat:
    """A file format the reader knows. ``read`` returns the file's contents, or None when the file is not in
    this format; it reports every key it does not understand in ``report.unknown_keys``."""

    name: str
    read: Callable[[_OpenedFile], Parsed | None]
    summary: str


def _read_edlora(f: _OpenedFile) -> Parsed | None:
    if not (f.is_pickle and _is_edlora(f.obj)):
        return None
    params = f.obj["params"]
    tokens = [LearnedToken(name, {"text_encoder": emb}, layerwise=True)
              for name, emb in (params.get("new_concept_embedding") or {}).items()]
    layers = {}
    for comp in ("text_encoder", "unet"):
        sub = params.get(comp) or {}
        got, _ = parse_diffusers(_flatten(sub), f.source, {}, None, comp, f.report, f.base)
        layers.update(got)
    other = set(params) - {"new_concept_embedding", "text_encoder", "unet"}
    f.report.unknown_keys.extend(f"params.{k}" for k in sorted(other))
    return "edlora", layers, tokens


def _read_textual_inversion(f: _OpenedFile) -> Parsed | None:
    tokens = _as_ti(f.obj if f.is_pickle else f.tensors, f.file)
    return None if tokens is None else ("textual-inversion", {}, tokens)


def _read_kohya(f: _OpenedFile) -> Parsed | None:
    if not any(k.startswith(KOHYA_PREFIXES) for k in f.keyed):
        return None
    unet_config = f.unet_config or _kohya_unet_layout(f.keyed, f.family)
    layers = parse_kohya({k: v for k, v in f.keyed.items() if isinstance(v, Tensor)}, f.source, unet_config,
                         f.strict, f.report, f.base)
    return "kohya", layers, []


def _read_diffusers(f: _OpenedFile) -> Parsed:
    layers, styles = parse_diffusers({k: v for k, v in f.keyed.items() if isinstance(v, Tensor)}, f.source, f.meta,
                                     f.adapter_cfg, None, f.report, f.base)
    fmt = "diffusers" if styles <= {"peft"} else "diffusers-legacy"
    if any(k.startswith("base_model.model.") for k in f.keyed):
        fmt = "peft"
    return fmt, layers, []


# Tried in order; the first that recognises the file reads it. Diffusers comes last and takes any other file
# (its unknown keys then say what did not fit). A new format is one reader function and one entry here.
FORMATS: tuple[LoraFormat, ...] = (
    LoraFormat("edlora", _read_edlora, "Mix-of-Show ED-LoRA .pth (layer-wise tokens and LoRA layers)"),
    LoraFormat("textual-inversion", _read_textual_inversion,
               "learned tokens only: A1111 .pt, SDXL clip_l / clip_g, diffusers learned_embeds"),
    LoraFormat("kohya", _read_kohya, "kohya / A1111 lora_unet_ / lora_te_ keys, LoCon and LyCORIS"),
    LoraFormat("diffusers", _read_diffusers,
               "diffusers / PEFT module paths (also legacy attention-processor and base_model.model. names)"),
)


# --- the public reader ---------------------------------------------------------------------------------------


def read_lora(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    family: str | None = None,
    unet_config: dict | None = None,
    strict: bool = True,
    base: Any = None,
) -> tuple[LoraSet, ReadReport]:
    """Like :func:`load_lora`, also returning a :class:`ReadReport` (warnings, evidence, unknown keys).

    ``strict=False`` lists unknown keys as warnings instead of raising (for ``inspect``).
    """
    path = Path(path)
    file, adapter_cfg = _resolve_path(path)
    source = str(file)
    obj, meta, is_pickle = read_raw(file, allow_pickle)
    report = ReadReport()
    flat = _flatten(obj) if is_pickle else obj
    tensors = {k: v for k, v in flat.items() if isinstance(v, Tensor)}
    try:
        check_finite(tensors, source)
    except ValueError as e:
        if strict:
            raise
        report.warnings.append(str(e).removeprefix(source + ": "))
    report.dtypes = {str(v.dtype).replace("torch.", "") for v in tensors.values()}

    keyed = obj["state_dict"] if is_pickle and isinstance(obj.get("state_dict"), dict) else flat
    opened = _OpenedFile(file, source, obj, tensors, keyed, meta, is_pickle, adapter_cfg, family, unet_config,
                         strict, report, base)
    fmt, layers, tokens = next(p for p in (f.read(opened) for f in FORMATS) if p is not None)
    # the family evidence first: an error about unknown keys can then say which model the file is for
    shapes = {k: layer.weight_shape for k, layer in layers.items()}
    evidence = _layer_evidence(layers, shapes)
    if fmt == "kohya" and any(n.startswith(("lora_te1_", "lora_te2_")) for n in keyed):
        evidence.append(("sdxl", "kohya lora_te1_/lora_te2_ prefixes (two text encoders)"))
    for t in tokens:
        if "text_encoder_2" in t.embeddings:
            evidence.append(("sdxl", f"token {t.name} has a text_encoder_2 embedding"))
        elif t.embeddings["text_encoder"].shape[-1] == 1024:
            evidence.append(("sd2", f"token {t.name} is 1024 wide"))
        elif t.embeddings["text_encoder"].shape[-1] == 768 and not layers:
            evidence.append(("sd1", f"token {t.name} is 768 wide with no second text encoder"))
    evidence += _metadata_evidence(meta)
    report.evidence = evidence
    if report.unknown_keys:
        shown = ", ".join(report.unknown_keys[:8]) + (
            f" and {len(report.unknown_keys) - 8} more" if len(report.unknown_keys) > 8 else "")
        msg = f"unknown keys (not a module of an SD UNet / CLIP text encoder, or an unsupported layer type): {shown}"
        if strict:
            mismatch = _family_mismatch(evidence, family)
            if mismatch:  # the likely reason first; the whole key list would bury it
                raise ValueError(f"{source}: {mismatch}; {len(report.unknown_keys)} of its keys name no module of "
                                 f"the base model, e.g. {report.unknown_keys[0]}")
            raise ValueError(f"{source}: {msg}. {_unknown_keys_hint(evidence)}")
        report.warnings.append(msg)
    if not layers and not tokens:
        raise ValueError(f"{source}: no LoRA layers and no learned tokens found; not a LoRA or embedding file")
    fam = decide_family(evidence, source, family, report)
    _fit_real_shapes(layers, fam, source, evidence)
    for w in report.warnings:
        log.warning("%s: %s", source, w)
    if layers and not tokens:
        tokens = _tokens_beside(file, meta, allow_pickle)
    lora = LoraSet(layers=layers, tokens=tokens, metadata=dict(meta), format=fmt, family=fam, source=source)
    return lora, report


def _tokens_beside(file: Path, meta: dict[str, str], allow_pickle: bool) -> list[LearnedToken]:
    """Learned tokens that :func:`loraclr.io.save_lora` wrote beside a LoRA (named in its metadata)."""
    name = meta.get("loraclr.embeddings")
    if not name:
        return []
    emb = file.with_name(name)
    if not emb.exists():
        log.warning("%s: its learned tokens %s are missing; the trigger tokens will be unknown", file, emb)
        return []
    from loraclr.io.embeddings import load_embeddings

    return load_embeddings(emb, allow_pickle=allow_pickle)


def _kohya_unet_layout(flat: dict[str, Any], family: str | None) -> dict | None:
    """The UNet config whose SGM names a kohya file uses (SD 1.x files with LDM names exist too)."""
    if not any(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for k in flat):
        return None
    if family in ("sd1", "sd2", "sdxl"):
        return keymap.real_unet_config(family)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in flat):
        return keymap.real_unet_config("sdxl")
    if any(k.startswith("lora_te_") for k in flat):
        return keymap.real_unet_config("sd1")
    for k, v in flat.items():
        if k.endswith("attn2_to_k.lora_down.weight") and isinstance(v, Tensor) and v.shape[-1] in (768, 1024):
            return keymap.real_unet_config("sd1")
    return keymap.real_unet_config("sdxl")


def _fit_real_shapes(layers: dict[str, Any], family: str, source: str, evidence: list[tuple[str, str]]) -> None:
    """Check UNet layers against the real UNet of the family, and give flat dense deltas their conv shape.

    A mismatch is an error only when the file's own shapes say it is for a real-sized model (tiny
    world-model LoRAs carry SD names with other widths).
    """
    if family not in ("sd1", "sdxl"):
        return
    real = keymap.unet_module_shapes(keymap.real_unet_config(family))
    shaped = any("wide" in why for _, why in evidence)
    for key, layer in list(layers.items()):
        comp, path = split_key(key)
        if comp != "unet":
            continue
        if path not in real:
            if shaped:
                raise ValueError(f"{source}: {key}: no such module in the {family} UNet; the file mixes layouts")
            continue
        want, got = real[path], tuple(layer.weight_shape)
        flat = lambda s: (s[0], math.prod(s[1:]))  # noqa: E731 - a 1x1 conv may be stored as a linear
        if got == want:
            continue
        if flat(got) == flat(want):
            if isinstance(layer, DenseDelta):  # LoHa/LoKr convs come out as (out, in*kh*kw)
                layers[key] = DenseDelta(layer.weight.reshape(want))
        elif shaped:
            raise ValueError(f"{source}: {key}: shape mismatch, the LoRA changes a {got} weight but the {family} "
                             f"module is {want}; the file is corrupt or mixes models")


def load_lora(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    family: str | None = None,
    unet_config: dict | None = None,
    base: Any = None,
) -> LoraSet:
    """Read any supported LoRA / embedding file into canonical form.

    Detects the format (kohya, diffusers, diffusers-legacy, peft, edlora, textual-inversion) and the base
    family (sd1, sd2, sdxl; "unknown" when nothing tells) from shapes, keys and metadata. ``family`` given
    and contradicted by the file raises ``ValueError`` with the evidence. Pickles (.pt/.pth/.ckpt/.bin) are
    refused unless ``allow_pickle``, and then loaded weights-only. ``unet_config`` is needed only for
    SGM-named kohya files of a non-standard (not real SDXL) UNet. ``base`` (a pipeline or components
    dict with real weights) is needed only for DoRA layers, whose delta depends on the base weight.
    """
    lora, _ = read_lora(path, allow_pickle=allow_pickle, family=family, unet_config=unet_config, base=base)
    return lora
