"""Writers: canonical layers or dense deltas -> kohya / diffusers LoRA files.

Dense deltas are factorised by truncated SVD (to a rank, or to the smallest rank keeping a share of the
squared singular values; a fixed rank through the smaller Gram's eigenvectors) and the exact relative error
of each layer is reported. LoraLayer inputs are written as they are (bit-exact).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from loraclr.io import keymap
from loraclr.io.safe import atomic_write, check_finite, check_output_path, unshare
from loraclr.lora import DenseDelta, LearnedToken, LoraLayer, split_key

log = logging.getLogger(__name__)

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


def factorize(delta: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[LoraLayer, float]:
    """Truncated SVD of one dense delta: ``(LoraLayer with alpha = rank, relative Frobenius error)``.

    ``rank`` caps the rank; ``energy`` in (0, 1] picks the smallest rank whose squared singular values sum to
    at least that share of the total (both given: the smaller rank). The singular values are split evenly
    (sqrt(S) on each factor) so neither factor dominates in low precision. Factors keep the delta's dtype;
    the decomposition runs in fp32 and the error is computed from the factors after the cast (never
    estimated).

    A fixed rank below the matrix's smaller side (the merge's export: rank 64 on SD-sized layers) takes the
    top-``rank`` eigenvectors of the smaller Gram instead of a full SVD (:func:`_top_subspace`): the same
    subspace up to fp32 round-off in the Gram, so the same error as the full SVD to ~5 digits, 3-10x faster
    on SD 1.5 shapes (1280x5120: 5.3 s -> 0.5 s, one thread). ``energy`` needs every singular value and keeps
    the full SVD.
    """
    if rank is None and energy is None:
        raise ValueError("a dense delta needs rank= or energy= to be written as a LoRA")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    shape = tuple(delta.shape)
    w = delta.detach().to(torch.float32).reshape(shape[0], -1)  # (out, in*kh*kw)
    if energy is None and rank < min(w.shape):
        up, s, down = _top_subspace(w, rank)
        r = rank
    else:
        up, s, down = torch.linalg.svd(w, full_matrices=False)
        r_max = s.numel()
        r = r_max if rank is None else min(rank, r_max)
        if energy is not None:
            e = s.square()
            total = float(e.sum())
            if total > 0:
                cum = torch.cumsum(e, 0) / total
                r = min(r, int(torch.searchsorted(cum, torch.tensor(energy - 1e-12)).item()) + 1)
        r = max(1, r)
    root = s[:r].sqrt()
    up = (up[:, :r] * root).to(delta.dtype)  # (out, r)
    down = (root[:, None] * down[:r]).to(delta.dtype)  # (r, in*kh*kw)
    norm = float(torch.linalg.norm(w))
    # exact error of what is written: W - up @ down with the cast factors (alpha = r: scale 1), one product
    resid = torch.addmm(w, up.to(torch.float32), down.to(torch.float32), alpha=-1)
    err = float(torch.linalg.norm(resid)) / norm if norm > 0 else 0.0
    if len(shape) == 4:
        up, down = up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    return LoraLayer(down=down.contiguous(), up=up.contiguous(), alpha=float(r)), err


def _top_subspace(w: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U (m, rank), S (rank,), Vh (rank, n)) of the best rank-``rank`` approximation of w (m, n), from the
    eigenvectors of the smaller Gram: with P the top-``rank`` eigenvectors, U S Vh is the SVD of the
    projection of w onto them (a (rank x n) or (m x rank) SVD). fp32 Gram round-off (~1e-7 of the largest
    eigenvalue) only mixes directions of nearly equal singular values, which changes the error negligibly;
    the caller measures the error from the result anyway."""
    m, n = w.shape
    if m <= n:
        _, vecs = torch.linalg.eigh(w @ w.T)  # ascending eigenvalues
        p = vecs[:, -rank:]  # (m, rank)
        ub, s, vh = torch.linalg.svd(p.T @ w, full_matrices=False)  # (rank, n) = Ub S Vh
        return p @ ub, s, vh
    _, vecs = torch.linalg.eigh(w.T @ w)
    p = vecs[:, -rank:]  # (n, rank)
    u, s, vb = torch.linalg.svd(w @ p, full_matrices=False)  # (m, rank) = U S Vb
    return u, s, vb @ p.T


def _to_layer(key: str, value: Any, rank: int | None, energy: float | None) -> tuple[LoraLayer, float]:
    if isinstance(value, LoraLayer):
        return value, 0.0
    if isinstance(value, DenseDelta):
        value = value.weight
    if not isinstance(value, Tensor):
        raise ValueError(f"{key}: expected a LoraLayer, DenseDelta or Tensor, got {type(value).__name__}")
    try:
        return factorize(value, rank, energy)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e


def _common(values: list[float]) -> float:
    return collections.Counter(values).most_common(1)[0][0]


def _kohya_tensors(layers: dict[str, LoraLayer], family: str, unet_config: dict | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, layer in layers.items():
        try:
            name = keymap.kohya_name(key, family, unet_config)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{key}: cannot be named in a {family} kohya file ({e.args[0]})") from e
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=layer.down.dtype)
        if float(out[f"{name}.alpha"]) != layer.alpha:  # alpha not representable in the factor dtype
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return out


def _peft_path(component: str, path: str) -> str:
    # PEFT matches patterns as suffixes of live module names; text encoders may or may not carry text_model.
    return path[len("text_model.") :] if component != "unet" and path.startswith("text_model.") else path


def _diffusers_tensors(layers: dict[str, LoraLayer]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    out: dict[str, Tensor] = {}
    by_comp: dict[str, dict[str, LoraLayer]] = collections.defaultdict(dict)
    for key, layer in layers.items():
        out[f"{key}.lora_A.weight"] = layer.down.contiguous()
        out[f"{key}.lora_B.weight"] = layer.up.contiguous()
        comp, path = split_key(key)
        by_comp[comp][path] = layer
    adapter: dict[str, Any] = {}
    for comp, group in by_comp.items():
        r = _common([g.rank for g in group.values()])
        a = _common([g.alpha for g in group.values()])
        cfg = {
            "r": int(r),
            "lora_alpha": a,
            "rank_pattern": {_peft_path(comp, p): g.rank for p, g in group.items() if g.rank != r},
            "alpha_pattern": {_peft_path(comp, p): g.alpha for p, g in group.items() if g.alpha != a},
            "target_modules": sorted(_peft_path(comp, p) for p in group),
            "use_dora": False,
            "lora_bias": False,
        }
        adapter.update({f"{comp}.{k}": v for k, v in cfg.items()})
    return out, adapter


def kohya_number(value) -> str:
    """A rank or alpha as kohya's ``ss_*`` metadata writes it: ``"4"``, ``"0.5"``."""
    return str(int(value)) if float(value).is_integer() else str(value)


def kohya_network_value(values) -> str:
    """``ss_network_dim`` / ``ss_network_alpha`` of layers with these ranks / alphas: the common value, or
    ``"Dynamic"`` where they differ."""
    distinct = set(values)
    return kohya_number(next(iter(distinct))) if len(distinct) == 1 else "Dynamic"


def kohya_metadata(layers: dict[str, LoraLayer], family: str, title: str, merged_from: list[str] | None) -> dict:
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": kohya_network_value(layer.rank for layer in layers.values()),
        "ss_network_alpha": kohya_network_value(layer.alpha for layer in layers.values()),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE[family],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": title,
    }
    if any(layer.is_conv and layer.down.shape[-1] > 1 for layer in layers.values()):
        conv = [layer for layer in layers.values() if layer.is_conv and layer.down.shape[-1] > 1]
        meta["ss_network_args"] = json.dumps({"conv_dim": kohya_number(_common([c.rank for c in conv])),
                                              "conv_alpha": kohya_number(_common([c.alpha for c in conv]))})
    if merged_from:
        sources = merged_from_record(merged_from)
        meta["modelspec.merged_from"] = ", ".join(s["file"] for s in sources)
        meta["loraclr.merged_from"] = json.dumps(sources)
    return meta


@functools.cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (size and mtime in the cache key: a rewritten file is hashed again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def merged_from_record(paths: list[str | Path]) -> list[dict[str, str]]:
    """What a merged LoRA records of its inputs: file name and sha256 of the file's bytes (as kohya's
    ``sshs_model_hash`` identifies a model), never the path, which says where someone keeps their files."""
    out = []
    for p in paths:
        p = Path(p)
        entry = {"file": p.name}
        if p.is_file():
            st = p.stat()
            entry["sha256"] = _file_sha256(p.resolve(), st.st_size, st.st_mtime_ns)
        out.append(entry)
    return out


def embeddings_path(path: Path, format: str) -> Path:
    """Where learned tokens of a LoRA go: ``<stem>.embeddings`` (kohya) / ``<stem>.learned_embeds.safetensors``."""
    if format == "kohya":
        return path.with_name(path.stem + ".embeddings")
    return path.with_name(path.stem + ".learned_embeds.safetensors")


def save_lora(
    layers: dict[str, LoraLayer | DenseDelta | Tensor],
    path: str | Path,
    *,
    format: str,
    family: str,
    rank: int | None = None,
    energy: float | None = None,
    tokens: list[LearnedToken] | None = None,
    metadata: dict | None = None,
    merged_from: list[str | Path] | None = None,
    unet_config: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Write layers as a kohya or diffusers LoRA file, atomically; returns {key: {"rank", "rel_error"}}.

    Dense deltas (Tensor = dW, or DenseDelta) are factorised by truncated SVD (:func:`factorize`);
    LoraLayers are written unchanged. kohya files get SD1 diffusers-style names or SDXL SGM names and the
    ``ss_*`` / ``modelspec.*`` metadata that A1111 and ComfyUI use to list a LoRA under the right base;
    diffusers files keep per-layer alphas in ``lora_adapter_metadata`` (PEFT rank/alpha patterns).
    Learned tokens go to an embedding file beside the LoRA (:func:`embeddings_path`). ``merged_from``: the
    input files of a merge, which the output may not replace; the metadata records their names and sha256
    (:func:`merged_from_record`). Nothing is written if any layer is invalid or non-finite.
    """
    path = Path(path)
    if format not in ("kohya", "diffusers"):
        raise ValueError(f"{path}: unknown LoRA format {format!r}; expected kohya or diffusers")
    if family not in BASE_MODEL_VERSION:
        raise ValueError(f"{path}: cannot write a LoRA for family {family!r}; expected one of {list(BASE_MODEL_VERSION)}")
    if not layers:
        raise ValueError(f"{path}: no layers to write")
    check_output_path(path, [p for p in (merged_from or []) if Path(p).exists()])
    report: dict[str, dict[str, float]] = {}
    out_layers: dict[str, LoraLayer] = {}
    for key, value in layers.items():
        split_key(key)
        layer, err = _to_layer(key, value, rank, energy)
        out_layers[key] = layer
        report[key] = {"rank": layer.rank, "rel_error": err}
    if format == "kohya":
        tensors = _kohya_tensors(out_layers, family, unet_config)
        meta = kohya_metadata(out_layers, family, path.stem, merged_from)
    else:
        tensors, adapter = _diffusers_tensors(out_layers)
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True),
                "modelspec.architecture": ARCHITECTURE[family]}
        if merged_from:
            meta["loraclr.merged_from"] = json.dumps(merged_from_record(merged_from))
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    check_finite(tensors, str(path))
    if tokens:
        from loraclr.io.embeddings import save_embeddings

        emb_path = embeddings_path(path, format)
        meta["loraclr.embeddings"] = emb_path.name
        for t in tokens:
            check_finite(t.embeddings, f"{path} token {t.name}")
    with atomic_write(path) as tmp:
        save_file(unshare(tensors), str(tmp), metadata=meta)
    if tokens:
        save_embeddings(tokens, emb_path, "a1111" if format == "kohya" else "diffusers")
    worst = max(report.items(), key=lambda kv: kv[1]["rel_error"])
    log.info("wrote %s: %d layers (%s), worst relative error %.3g at %s", path, len(report), format,
             worst[1]["rel_error"], worst[0])
    return report
