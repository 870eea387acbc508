"""The evaluator networks of the miniature world: an identity embedder and a small image-text model.

* :class:`IdentityNet` ("our ArcFace"): a small CNN on one character's region, L2-normalised embedding.
  Trained with a margin softmax over many identities plus per-trait heads (``loraclr.world.evaluator_training``).
* :class:`TextImageNet` ("our CLIP"): a CNN image tower and a small transformer text tower over the real CLIP
  tokenizer's ids, trained CLIP-style on (render, caption) pairs. Only the token ids that occur in the world's
  captions have their own embedding; every other id (e.g. a LoRA trigger word) maps to one "unknown" entry.

Files: fp16 ``.safetensors`` with the network's config as JSON in the header (``loraclr.config``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, UNK = 0, 1  # compact-vocabulary ids


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvTower(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, dim): two stem convs that halve the side once, then per further width a
    stride-2 and a stride-1 conv, global average pooling, linear projection. Halving early keeps a training
    step cheap on a CPU."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), dim: int = 128, stem_stride: int = 2):
        super().__init__()
        # stem_stride 1 sees full-resolution edges before downsampling (the identity net needs the eyes);
        # the second conv then halves the side instead, so the cost barely grows.
        layers: list[nn.Module] = [_conv(3, widths[0], stem_stride), _conv(widths[0], widths[0], 3 - stem_stride)]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [_conv(c_in, c_out, 2), _conv(c_out, c_out, 1)]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(widths[-1], dim)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features((x - self.mean) / 0.25)
        return self.proj(h.float().mean(dim=(2, 3)).to(h.dtype))


class IdentityNet(nn.Module):
    """Region crop (B, 3, S, S) -> unit embedding (B, dim). ``heads`` classify traits (training only)."""

    def __init__(self, input_size: int = 48, widths: tuple[int, ...] = (32, 64, 128), dim: int = 128,
                 traits: dict[str, int] | None = None, stem_stride: int = 1):
        super().__init__()
        self.config = {"kind": "identity", "input_size": input_size, "widths": list(widths), "dim": dim,
                       "traits": dict(traits or {}), "stem_stride": stem_stride}
        self.input_size = input_size
        self.tower = ConvTower(tuple(widths), dim, stem_stride)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in (traits or {}).items()})

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(crops), dim=-1)


class TextTower(nn.Module):
    """Compact token ids (B, L) -> (B, dim): embeddings + positions, a small transformer encoder, the mean
    over non-padding tokens, a projection."""

    def __init__(self, n_vocab: int, width: int = 96, layers: int = 2, heads: int = 4, max_len: int = 77,
                 dim: int = 128):
        super().__init__()
        self.tok = nn.Embedding(n_vocab, width, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == PAD  # (B, L)
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.proj((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class TextImageNet(nn.Module):
    """CLIP-style pair of towers with a shared unit-sphere space and a learned temperature."""

    def __init__(self, vocab_ids: list[int], image_size: int = 64, widths: tuple[int, ...] = (32, 64, 128),
                 width: int = 96, layers: int = 2, heads: int = 4, max_len: int = 77, dim: int = 128):
        super().__init__()
        self.config = {"kind": "text-image", "image_size": image_size, "widths": list(widths), "width": width,
                       "layers": layers, "heads": heads, "max_len": max_len, "dim": dim,
                       "n_vocab": len(vocab_ids) + 2}
        self.image_size = image_size
        self.max_len = max_len
        self.image = ConvTower(tuple(widths), dim)
        self.text = TextTower(len(vocab_ids) + 2, width, layers, heads, max_len, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP starts
        # CLIP token id -> compact id; a buffer so that it travels with the weights
        self.register_buffer("vocab_ids", torch.tensor(sorted(vocab_ids), dtype=torch.long))
        self._lookup: dict[int, int] | None = None

    def compact(self, token_ids: list[list[int]]) -> torch.Tensor:
        """CLIP token ids (ragged) -> padded compact ids (B, L) with L <= max_len."""
        if self._lookup is None:
            self._lookup = {int(t): i + 2 for i, t in enumerate(self.vocab_ids.tolist())}
        rows = [[self._lookup.get(int(t), UNK) for t in ids[: self.max_len]] for ids in token_ids]
        out = torch.full((len(rows), max(1, max(len(r) for r in rows))), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unit (B, dim); images are resized to the tower's side."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return F.normalize(self.image(images), dim=-1)

    def encode_ids(self, compact_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(compact_ids), dim=-1)


def save_net(net: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """fp16 safetensors with the config (and ``extra``) as JSON metadata, written atomically."""
    from safetensors.torch import save_file

    from loraclr.io.safe import atomic_write

    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
             for k, v in net.state_dict().items() if not k.startswith("heads.")}
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: non-finite weights in {k}; not saving")
    meta = {"loraclr.config": json.dumps(net.config), "loraclr.extra": json.dumps(extra or {})}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    return path


def load_net(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A network saved by :func:`save_net`, in fp32 eval mode, and its ``extra`` metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluator weights not found (run scripts/train_evaluators.py)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "loraclr.config" not in meta:
        raise ValueError(f"{path}: no 'loraclr.config' in the safetensors header; not an evaluator file")
    cfg = json.loads(meta["loraclr.config"])
    kind = cfg.get("kind")
    if kind == "identity":
        net: nn.Module = IdentityNet(cfg["input_size"], tuple(cfg["widths"]), cfg["dim"],
                                     stem_stride=cfg.get("stem_stride", 2))
    elif kind == "text-image":
        net = TextImageNet(state["vocab_ids"].tolist(), cfg["image_size"], tuple(cfg["widths"]), cfg["width"],
                           cfg["layers"], cfg["heads"], cfg["max_len"], cfg["dim"])
    else:
        raise ValueError(f"{path}: unknown evaluator kind {kind!r}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("heads.")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the {kind} network: missing {missing}, "
                         f"unexpected {unexpected}")
    net.eval()
    return net, json.loads(meta.get("loraclr.extra", "{}"))
