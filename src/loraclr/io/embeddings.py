"""Textual-inversion embeddings: A1111 (``emb_params``; SDXL ``clip_l``/``clip_g``) and diffusers layouts.

Layouts written:
- ``a1111``: one safetensors file per token, named after the token (A1111 and ComfyUI take the trigger
  word from the file name): ``{"emb_params": (n, dim)}`` for one text encoder, ``{"clip_l": (n, 768),
  "clip_g": (n, 1280)}`` for SDXL. Several tokens go into a folder.
- ``diffusers``: one ``learned_embeds.safetensors``-style file ``{token: (n, dim)}`` (text_encoder only);
  SDXL tokens use the clip_l/clip_g layout, one file per token, as diffusers' SDXL examples do.
ED-LoRA's layer-wise tokens are marked ``loraclr.layerwise=true`` in the metadata, since their n rows are
per-layer variants of one token, not n consecutive tokens.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from safetensors.torch import save_file

from loraclr.io.safe import atomic_write, check_finite, check_output_path, unshare
from loraclr.lora import LearnedToken

log = logging.getLogger(__name__)


def _file_name(token: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", token.strip("<>")) or "token"
    return name + ".safetensors"


def _tensors(tok: LearnedToken, fmt: str) -> dict:
    te1, te2 = tok.embeddings.get("text_encoder"), tok.embeddings.get("text_encoder_2")
    if te2 is not None:
        out = {"clip_g": te2.contiguous()}
        if te1 is not None:
            out["clip_l"] = te1.contiguous()
        return out
    if te1 is None:
        raise ValueError(f"token {tok.name}: no embedding for text_encoder or text_encoder_2")
    return {"emb_params": te1.contiguous()} if fmt == "a1111" else {tok.name: te1.contiguous()}


def save_embeddings(tokens: list[LearnedToken], path: str | Path, format: str = "a1111") -> list[Path]:
    """Write learned tokens; returns the files written.

    ``path`` is a ``.safetensors`` file when everything fits in one file, else a folder (created).
    """
    if format not in ("a1111", "diffusers"):
        raise ValueError(f"{path}: unknown embedding format {format!r}; expected a1111 or diffusers")
    if not tokens:
        raise ValueError(f"{path}: no tokens to write")
    path = Path(path)
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate token names {names}")
    per_file = format == "a1111" or any("text_encoder_2" in t.embeddings for t in tokens)
    files: dict[str, tuple[dict, dict]] = {}
    for t in tokens:
        meta = {"name": t.name, "loraclr.layerwise": str(t.layerwise).lower()}
        if per_file:
            files[_file_name(t.name)] = (_tensors(t, format), meta)
        else:
            tensors, m = files.setdefault("", ({}, {"loraclr.layerwise": "false"}))
            tensors.update(_tensors(t, format))
            if t.layerwise:
                m["loraclr.layerwise"] = "true"
    for tensors, _ in files.values():
        check_finite(tensors, str(path))
    check_output_path(path)
    if len(files) == 1 and path.suffix == ".safetensors":
        (tensors, meta), = files.values()
        with atomic_write(path) as tmp:
            save_file(unshare(tensors), str(tmp), metadata=meta)
        return [path]
    with atomic_write(path) as tmp:
        tmp.mkdir()
        for name, (tensors, meta) in files.items():
            save_file(unshare(tensors), str(tmp / name), metadata=meta)
    return [path / name for name in files]


def load_embeddings(path: str | Path, *, allow_pickle: bool = False) -> list[LearnedToken]:
    """Learned tokens from one embedding file or a folder of them (A1111, diffusers, SDXL layouts)."""
    from loraclr.io.read import load_lora

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".bin")) if path.is_dir() \
        else [path]
    tokens: list[LearnedToken] = []
    for f in files:
        lora = load_lora(f, allow_pickle=allow_pickle)
        if lora.layers:
            raise ValueError(f"{f}: holds LoRA layers, not an embedding")
        meta = lora.metadata
        for t in lora.tokens:
            if meta.get("name") and len(lora.tokens) == 1:
                t.name = meta["name"]
            t.layerwise = meta.get("loraclr.layerwise") == "true" or t.layerwise
        tokens.extend(lora.tokens)
    return tokens
