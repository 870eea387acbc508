"""The paper's three metrics and their statistics, as pure functions on embeddings (LoRACLR Table 1).

* text alignment: cosine between an image's and its prompt's embeddings (CLIP-T);
* image alignment: cosine between an image's embedding and the mean embedding of the concept's reference
  images (CLIP-I);
* identity alignment: the RATE at which the intended identity is recognised: its distance to the identity's
  reference embedding is under a calibrated threshold, and (strict, like a recogniser) it is the nearest of
  the gallery's identities.

Embeddings are expected L2-normalised; distances are ``1 - cosine``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of (B, D) and (B, D) (or (D,) broadcast) -> (B,)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1)


def reference_embedding(embeddings: Tensor) -> Tensor:
    """Mean of (R, D) unit embeddings of reference images, renormalised -> (D,)."""
    return torch.nn.functional.normalize(embeddings.float().mean(0), dim=-1)


def distances(queries: Tensor, gallery: Tensor) -> Tensor:
    """(B, D) x (C, D) unit embeddings -> (B, C) cosine distances."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    return 1.0 - q @ g.T


def recognised(dist: Tensor, target: Tensor, threshold: float, strict: bool = True) -> Tensor:
    """(B, C) distances to the gallery, (B,) intended gallery index -> (B,) bool.

    Recognised when the distance to the intended identity is below ``threshold`` and, if ``strict``, no other
    gallery identity is nearer.
    """
    own = dist.gather(1, target.view(-1, 1)).squeeze(1)
    ok = own < threshold
    if strict:
        ok &= dist.argmin(1) == target
    return ok


def threshold_at_far(impostor: Tensor, far: float) -> float:
    """The largest threshold whose false-accept rate (impostor distances below it) is at most ``far``."""
    imp = impostor.float().flatten().sort().values
    k = int(far * len(imp))  # number of impostors allowed below the threshold
    return float(imp[k]) if k < len(imp) else float(imp[-1]) + 1e-6


def equal_error_threshold(genuine: Tensor, impostor: Tensor) -> tuple[float, float]:
    """(threshold, rate) where the false-reject rate of ``genuine`` equals the false-accept rate of ``impostor``
    (distances; accept = below the threshold)."""
    cand = torch.cat([genuine.flatten(), impostor.flatten()]).float().sort().values
    frr = (genuine.flatten()[None, :] >= cand[:, None]).float().mean(1)
    far = (impostor.flatten()[None, :] < cand[:, None]).float().mean(1)
    i = int((frr - far).abs().argmin())
    return float(cand[i]), float((frr[i] + far[i]) / 2)


def retrieval_top1(image_emb: Tensor, text_emb: Tensor) -> tuple[float, float]:
    """Rates at which, among B pairs, the true caption ranks first for its image, and the true image first
    for its caption (row i of each is a pair)."""
    sim = image_emb.float() @ text_emb.float().T
    target = torch.arange(len(sim))
    return float((sim.argmax(1) == target).float().mean()), float((sim.argmax(0) == target).float().mean())


def mean_ci(values: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and a percentile-bootstrap confidence interval: (mean, low, high). One value gives (v, v, v)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(v) == 0:
        raise ValueError("mean_ci of no values")
    mean = float(v.mean())
    if len(v) == 1:
        return mean, mean, mean
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(v), (n_boot, len(v)), generator=g)
    boots = v[idx].mean(1)
    alpha = (1 - level) / 2
    return mean, float(torch.quantile(boots, alpha)), float(torch.quantile(boots, 1 - alpha))


def summary(values) -> dict | None:
    """``{"mean", "low", "high", "n"}`` of :func:`mean_ci` over the values (float64), or None without values."""
    if len(values) == 0:
        return None
    m, lo, hi = mean_ci(torch.as_tensor(values, dtype=torch.float64))
    return {"mean": m, "low": lo, "high": hi, "n": len(values)}
