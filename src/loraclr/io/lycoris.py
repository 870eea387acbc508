"""Exact dense deltas of LyCORIS layers (LoHa, LoKr, Tucker ``lora_mid``, full ``diff``).

Pure tensor maths: each function takes one module's tensors (suffix -> tensor, as stored after the module
name) and returns dW. Formulas follow LyCORIS' own weight reconstruction:
- LoHa:   dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r      (Hadamard product; Tucker cores t1/t2 for convs)
- LoKr:   dW = kron(w1, w2) * alpha / r, w1 = w1a @ w1b or full, w2 = w2a @ w2b or full (t2: Tucker core);
          when neither factor is decomposed LyCORIS applies no alpha scaling (scale 1).
- Tucker: dW[p, q, k, l] = sum_ij up[p, i] mid[i, j, k, l] down[j, q] * alpha / r
"""

from __future__ import annotations

import torch
from torch import Tensor

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _f(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _alpha(parts: dict[str, Tensor], rank: int) -> float:
    a = parts.get("alpha")
    return float(a) if a is not None else float(rank)


def loha_delta(parts: dict[str, Tensor]) -> Tensor:
    """dW of a LoHa module; (out, in) or (out, in, kh, kw) with Tucker cores, else (out, in*kh*kw)."""
    r = parts["hada_w1_b"].shape[0]
    scale = _alpha(parts, r) / r
    if "hada_t1" in parts:
        w1 = torch.einsum("ijkl,jr,ip->prkl", _f(parts["hada_t1"]), _f(parts["hada_w1_b"]), _f(parts["hada_w1_a"]))
        w2 = torch.einsum("ijkl,jr,ip->prkl", _f(parts["hada_t2"]), _f(parts["hada_w2_b"]), _f(parts["hada_w2_a"]))
    else:
        w1 = _f(parts["hada_w1_a"]) @ _f(parts["hada_w1_b"])  # (out, in*k*k)
        w2 = _f(parts["hada_w2_a"]) @ _f(parts["hada_w2_b"])
    return w1 * w2 * scale


def lokr_delta(parts: dict[str, Tensor]) -> Tensor:
    """dW of a LoKr module: kron(w1, w2) times the LyCORIS scale."""
    rank = None
    if "lokr_w1" in parts:
        w1 = _f(parts["lokr_w1"])
    else:
        w1 = _f(parts["lokr_w1_a"]) @ _f(parts["lokr_w1_b"])
        rank = parts["lokr_w1_b"].shape[0]
    if "lokr_w2" in parts:
        w2 = _f(parts["lokr_w2"])
    elif "lokr_t2" in parts:
        w2 = torch.einsum("ijkl,jr,ip->prkl", _f(parts["lokr_t2"]), _f(parts["lokr_w2_b"]), _f(parts["lokr_w2_a"]))
        rank = parts["lokr_w2_b"].shape[0]
    else:
        w2 = _f(parts["lokr_w2_a"]) @ _f(parts["lokr_w2_b"])
        rank = parts["lokr_w2_b"].shape[0]
    scale = 1.0 if rank is None else _alpha(parts, rank) / rank
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2) * scale


def tucker_delta(down: Tensor, mid: Tensor, up: Tensor, alpha: float | None) -> Tensor:
    """dW of a LoCon layer with a Tucker core: (out, in, kh, kw)."""
    r = down.shape[0]
    scale = (float(alpha) if alpha is not None else float(r)) / r
    d = _f(down).reshape(r, -1)  # (r, in)
    u = _f(up).reshape(up.shape[0], -1)  # (out, r)
    return torch.einsum("ijkl,jq,pi->pqkl", _f(mid), d, u) * scale


def dora_delta(w0: Tensor, dw: Tensor, magnitude: Tensor) -> Tensor:
    """Exact dW of a DoRA layer: ``m * (W0 + dW) / ||W0 + dW|| - W0``.

    ``magnitude`` (out,) or (out, 1, ...) normalises each output row (PEFT ``lora_magnitude_vector``,
    LyCORIS ``wd_on_out``); (1, in, ...) normalises each input column (LyCORIS default before wd_on_out).
    """
    w = w0.to(torch.float32) + dw.to(torch.float32).reshape(w0.shape)
    m = magnitude.to(torch.float32)
    rest = [1] * (w.dim() - 1)
    if m.numel() == w.shape[0] and (m.dim() == 1 or m.shape[0] == w.shape[0]):
        norm = w.reshape(w.shape[0], -1).norm(dim=1)  # (out,)
        scale = (m.reshape(-1) / norm).reshape(-1, *rest)
    elif m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] == w.shape[1] and m.numel() == w.shape[1]:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)  # (in,)
        scale = (m.reshape(-1) / norm).reshape(1, -1, *rest[1:])
    else:
        raise ValueError(f"DoRA magnitude of shape {tuple(m.shape)} does not fit a weight of shape {tuple(w.shape)}")
    return w * scale - w0.to(torch.float32)
