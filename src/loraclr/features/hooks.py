"""Forward hooks that record layer inputs for the merge (feature collection). The hooks that change what a
model computes (LoRAs applied, layer-wise states) are model surgery: :mod:`loraclr.surgery.hooks`.

Every hook is installed by a context manager that removes it in ``finally``, also when the forward pass
raises. Nothing here changes a weight, so the model is exactly as it was after every ``with`` block.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InputCapture", "RowRecorder", "module_rows"]

log = logging.getLogger(__name__)


# --- recording inputs --------------------------------------------------------------------------------------


def module_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows a layer multiplies by its (flattened) weight: (n, d_in) in the input's dtype (a bf16 feature
    run's rows are converted to fp32 by the recorder after subsampling, not all of them).

    Linear: every position of ``x`` (..., in). Conv2d: unfolded patches (B*H'*W', in*kh*kw), in the order of
    ``weight.reshape(out, -1)``; a 1x1 conv gives per-pixel channel vectors.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported")
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid"):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # (B, in*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class RowRecorder:
    """Rows of one layer input for one concept, subsampled deterministically, and optional Gram statistics.

    cap: rows kept in the end (0 = all). Each call keeps at most ``ceil(cap / expected_calls)`` rows chosen by a
    generator seeded from (seed, call index) only, so every concept keeps the same positions of equally
    shaped calls (blocks stay aligned across concepts) and memory stays ~cap rows per layer.
    gram: accumulate X^T X (fp32) and the row count over *all* rows, before subsampling.
    """

    def __init__(self, cap: int = 0, expected_calls: int = 1, seed: int = 0, gram: bool = False):
        self.cap = cap
        self.per_call = math.ceil(cap / max(expected_calls, 1)) if cap else 0
        self.seed = seed
        self.keep_gram = gram
        self.chunks: list[Tensor] = []
        self.gram: Tensor | None = None
        self.n_rows = 0
        self.calls = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach()  # (n, d_in)
        if self.keep_gram:
            rows = rows.float()
            g = rows.T @ rows  # (d_in, d_in), fp32
            self.gram = g if self.gram is None else self.gram + g
        self.n_rows += rows.shape[0]
        if self.per_call and rows.shape[0] > self.per_call:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
            idx = torch.randperm(rows.shape[0], generator=gen)[: self.per_call].sort().values
            rows = rows[idx]  # a copy: nothing is kept of the layer's input
            self.chunks.append(rows.float())  # fp32 of the kept rows only (the same values as converting all)
        else:
            self.chunks.append(rows.float() if rows.dtype != torch.float32 else rows.clone())
        self.calls += 1

    def rows(self) -> Tensor:
        """(n_kept, d_in) fp32."""
        if not self.chunks:
            raise RuntimeError("no rows were recorded")
        X = torch.cat(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        if self.cap and X.shape[0] > self.cap:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)
            X = X[torch.randperm(X.shape[0], generator=gen)[: self.cap].sort().values]
        self.chunks = [X]
        return X


class InputCapture:
    """Records the inputs of many modules at once; modules fed the very same tensor share one recorder.

    q/k/v projections receive one tensor object, so their inputs are recorded once: the
    first module that sees a tensor owns the recorder; a sibling (same parent module) called next with the
    very same object becomes an alias of it. ``select`` optionally picks rows (e.g. token positions) from each input
    before it is stored: ``select(key, module, x) -> rows`` replacing :func:`module_rows`.
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, cap: int = 0, expected_calls: int = 1,
                 seed: int = 0, gram: bool = False, select=None):
        self.modules = dict(modules)
        self.recorders: dict[str, RowRecorder] = {}
        self.alias: dict[str, str] = {}
        self._opts = dict(cap=cap, expected_calls=expected_calls, gram=gram)
        self._seed = seed
        self._select = select
        self._last: tuple[Tensor, str, nn.Module] | None = None
        self._handles: list = []

    def _hook(self, key: str):
        def pre_hook(module, args):
            x = args[0]
            owner = self.alias.get(key)
            if owner is None and self._last is not None:
                last_x, last_key, last_mod = self._last
                siblings = key.rsplit(".", 1)[0] == last_key.rsplit(".", 1)[0]
                if x is last_x and siblings and type(module) is type(last_mod) \
                        and _same_input_geometry(module, last_mod):
                    owner = self.alias[key] = self.alias.get(last_key, last_key)
            if owner is None:
                owner = self.alias.setdefault(key, key)
            self._last = (x, key, module)
            if owner != key:
                return None
            rec = self.recorders.get(key)
            if rec is None:
                seed = self._seed * 7919 + zlib.crc32(key.encode())  # varies by layer, never by concept
                rec = self.recorders[key] = RowRecorder(seed=seed, **self._opts)
            rows = self._select(key, module, x) if self._select else module_rows(module, x)
            if rows is not None and rows.shape[0]:
                rec.add(rows)
            return None

        return pre_hook

    def __enter__(self) -> InputCapture:
        try:
            for key, mod in self.modules.items():
                self._handles.append(mod.register_forward_pre_hook(self._hook(key)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def rows(self, key: str) -> Tensor:
        """(n, d_in) rows recorded for ``key`` (shared with its aliases)."""
        owner = self.alias.get(key)
        if owner is None or owner not in self.recorders:
            raise KeyError(f"{key}: the layer was never called during feature collection")
        return self.recorders[owner].rows()

    def stats(self, key: str) -> tuple[Tensor | None, int]:
        rec = self.recorders[self.alias[key]]
        return rec.gram, rec.n_rows


def _same_input_geometry(a: nn.Module, b: nn.Module) -> bool:
    if isinstance(a, nn.Conv2d):
        return (a.kernel_size, a.stride, a.padding, a.dilation) == (b.kernel_size, b.stride, b.padding, b.dilation)
    return getattr(a, "in_features", None) == getattr(b, "in_features", None)


