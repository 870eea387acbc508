"""Feature-free merges that work on the deltas alone: sum, average, svd, ties, dare.

They combine the dense deltas dW_i (strengths already applied; never the LoRA factors separately, which is
not a sum of deltas). Semantics follow PEFT's ``utils/merge_utils.py`` (task_arithmetic, ties with
``majority_sign_method``, dare_linear / dare_ties) and ``add_weighted_adapter(combination_type="svd")``;
the per-concept weights PEFT takes are 1 here because the strengths are already inside dW_i.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from loraclr.merge._common import (
    all_finite,
    check_device,
    check_problem,
    resolve_dtype,
    stacked_deltas,
    summed_deltas,
)
from loraclr.merge.api import Callback, LayerProblem, LayerResult, MergeMethod, register

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeltaConfig:
    """Settings shared by the feature-free methods (compute device and precision)."""

    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)
        check_device(self.device)


def _result(problem: LayerProblem, offset: Tensor, **report) -> LayerResult:
    if not all_finite(offset):
        raise ValueError(f"layer {problem.key}: the merged offset has NaN/inf values")
    offset = offset.to(device=problem.W0.device, dtype=torch.float32)
    return LayerResult(offset, {"loss": None, "converged": None, **report})


def merge_sum(problem: LayerProblem, config: DeltaConfig, callback: Callback | None = None) -> LayerResult:
    """Exact sum of deltas: D = sum_i dW_i (naive LoRA stacking). Needs no features."""
    check_problem(problem)
    return _result(problem, summed_deltas(problem, resolve_dtype(config.dtype), config.device))


def merge_average(
    problem: LayerProblem, config: DeltaConfig, callback: Callback | None = None
) -> LayerResult:
    """FedAvg: D = (1/N) sum_i dW_i (Mix-of-Show's "weight fusion" baseline). Needs no features."""
    check_problem(problem)
    total = summed_deltas(problem, resolve_dtype(config.dtype), config.device)
    return _result(problem, total / len(problem.deltas) if problem.deltas else total)


def merge_none(problem: LayerProblem, config: DeltaConfig, callback: Callback | None = None) -> LayerResult:
    """No LoRA weight at all: D = 0, the base weights. The concepts' learned tokens (textual inversion, ED-LoRA)
    are still added by the merge, so this is the reference for what the LoRA weights add on top of them
    (``bench/quality.py``: at N = 12 in the miniature world every method keeps about as much identity as this).
    Needs no features."""
    check_problem(problem)
    return _result(problem, torch.zeros(tuple(problem.W0.shape), dtype=torch.float32))


@dataclass(frozen=True)
class SvdConfig(DeltaConfig):
    """rank: truncation rank of the summed delta; None = the largest input rank (PEFT's default), read from
    ``LayerProblem.ranks`` when given, else estimated numerically (torch.linalg.matrix_rank).
    clamp: optional quantile in (0, 1] at which the factors' entries are clipped (PEFT's ``svd_clamp``)."""

    rank: int | None = None
    clamp: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")
        if self.clamp is not None and not 0 < self.clamp <= 1:
            raise ValueError(f"clamp must be a quantile in (0, 1] or None, got {self.clamp!r}")


def merge_svd(problem: LayerProblem, config: SvdConfig, callback: Callback | None = None) -> LayerResult:
    """Sum of deltas truncated to a rank: D = U_r S_r V_r^T of sum_i dW_i (PEFT ``combination_type="svd"``,
    after kohya's ``svd_merge_lora.py``). Needs no features. Reports the relative Frobenius error of the
    truncation."""
    check_problem(problem)
    deltas = stacked_deltas(problem, resolve_dtype(config.dtype), config.device)
    if len(deltas) == 0:
        return _result(problem, torch.zeros_like(problem.W0, dtype=torch.float32), rank=0, rel_error=0.0)
    total = deltas.sum(0)  # (out, in)
    rank = config.rank
    if rank is None:
        ranks = getattr(problem, "ranks", None)
        if ranks and all(r is not None for r in ranks):
            rank = max(int(r) for r in ranks)
        else:
            rank = max(int(torch.linalg.matrix_rank(d)) for d in deltas)
    rank = max(0, min(rank, *total.shape))
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    U, S, Vh = U[:, :rank] * S[:rank], S[:rank], Vh[:rank]  # up (out, r) carries S, as PEFT does
    if config.clamp is not None and rank > 0:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), config.clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    offset = U @ Vh
    norm = float(total.norm())
    rel = float((offset - total).norm()) / norm if norm > 0 else 0.0
    return _result(problem, offset, rank=rank, rel_error=rel)


def _check_density_and_sign(density: float, majority_sign_method: str) -> None:
    """Settings shared by TIES and DARE."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")


@dataclass(frozen=True)
class TiesConfig(DeltaConfig):
    """density: fraction of each delta's entries kept by magnitude (TIES paper's k = 20 %).
    majority_sign_method: "total" (sign of the summed kept values) or "frequency" (sign of the vote count)."""

    density: float = 0.2
    majority_sign_method: str = "total"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_density_and_sign(self.density, self.majority_sign_method)


def _magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) largest-magnitude entries (PEFT ``magnitude_based_pruning``)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    if k > 0:
        mask[torch.topk(t.abs().flatten(), k).indices] = 1
    return t * mask.view_as(t)


def _disjoint_mean(tasks: Tensor, method: str) -> Tensor:
    """Elect a sign per entry, then average the entries agreeing with it (zeros never agree: their sign is
    0). tasks: (N, out, in)."""
    sign = tasks.sign()
    votes = tasks.sum(0) if method == "total" else sign.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = (sign == majority).to(tasks.dtype)
    return (tasks * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def merge_ties(problem: LayerProblem, config: TiesConfig, callback: Callback | None = None) -> LayerResult:
    """TIES-merging (Yadav et al. 2023) on deltas: trim each dW_i to its top ``density`` entries by
    magnitude, elect the sign per entry (sum of kept values, or vote count), then average the kept entries
    that agree with it. Needs no features."""
    check_problem(problem)
    deltas = stacked_deltas(problem, resolve_dtype(config.dtype), config.device)
    if len(deltas) == 0:
        return _result(problem, torch.zeros_like(problem.W0, dtype=torch.float32))
    trimmed = torch.stack([_magnitude_prune(d, config.density) for d in deltas])
    return _result(problem, _disjoint_mean(trimmed, config.majority_sign_method))


@dataclass(frozen=True)
class DareConfig(DeltaConfig):
    """density: probability of keeping each entry (kept entries are divided by it, so the expectation is
    unchanged; at 0.5 the relative noise per entry, sqrt((1-p)/p), is 1). sign_election: DARE-TIES (elect
    signs, disjoint mean) instead of DARE-linear (plain sum). seed: global seed of the masks."""

    density: float = 0.5
    sign_election: bool = False
    majority_sign_method: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_density_and_sign(self.density, self.majority_sign_method)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


def dare_mask_seed(seed: int, key: str, delta: Tensor) -> int:
    """Seed of one concept's drop mask: a hash of (global seed, layer key, the delta's float32 bytes).

    It depends on what the delta *is*, not on its position in the concept list, so reordering concepts
    reorders nothing in the result (order invariance), and two layers never share a mask.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    h.update(key.encode())
    h.update(delta.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def merge_dare(problem: LayerProblem, config: DareConfig, callback: Callback | None = None) -> LayerResult:
    """DARE (Yu et al. 2024) on deltas: drop each entry of dW_i with probability 1 - density and rescale the
    survivors by 1 / density, then sum (PEFT ``dare_linear``) or, with ``sign_election``, take the TIES
    disjoint mean (``dare_ties``). Masks come from a CPU generator seeded by :func:`dare_mask_seed`, so the
    result is reproducible across devices and independent of concept order. Needs no features."""
    check_problem(problem)
    deltas = stacked_deltas(problem, resolve_dtype(config.dtype), config.device)
    if len(deltas) == 0:
        return _result(problem, torch.zeros_like(problem.W0, dtype=torch.float32))
    dropped = []
    for d in deltas:
        if config.density >= 1:
            dropped.append(d)
            continue
        g = torch.Generator().manual_seed(dare_mask_seed(config.seed, problem.key, d))
        keep = torch.rand(d.shape, generator=g) < config.density
        dropped.append(d * keep.to(device=d.device, dtype=d.dtype) / config.density)
    tasks = torch.stack(dropped)
    offset = _disjoint_mean(tasks, config.majority_sign_method) if config.sign_election else tasks.sum(0)
    return _result(problem, offset)


register(
    MergeMethod(
        name="sum",
        fn=merge_sum,
        config_cls=DeltaConfig,
        needs_features=False,
        reference="naive LoRA stacking",
        summary="exact sum of the deltas",
    )
)
register(
    MergeMethod(
        name="average",
        fn=merge_average,
        config_cls=DeltaConfig,
        needs_features=False,
        reference="FedAvg (McMahan et al. 2017; Mix-of-Show baseline)",
        summary="mean of the deltas",
    )
)
register(
    MergeMethod(
        name="none",
        fn=merge_none,
        config_cls=DeltaConfig,
        needs_features=False,
        reference="reference: the base weights plus the concepts' learned tokens",
        summary="no LoRA weight (learned tokens only)",
        label="tokens only",
    )
)
register(
    MergeMethod(
        name="svd",
        fn=merge_svd,
        config_cls=SvdConfig,
        needs_features=False,
        reference="PEFT add_weighted_adapter(combination_type='svd')",
        summary="sum of the deltas truncated to a rank",
    )
)
register(
    MergeMethod(
        name="ties",
        fn=merge_ties,
        config_cls=TiesConfig,
        needs_features=False,
        reference="TIES-merging, Yadav et al. 2023 (arXiv 2306.01708); PEFT ties",
        summary="trim by magnitude, elect sign, disjoint mean",
    )
)
register(
    MergeMethod(
        name="dare",
        fn=merge_dare,
        config_cls=DareConfig,
        needs_features=False,
        reference="DARE, Yu et al. 2024 (arXiv 2311.03099); PEFT dare_linear",
        summary="random drop with rescale (seeded), then sum",
    )
)
