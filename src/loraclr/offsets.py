"""Where a merge keeps its solved offsets D (out, in) until every stage is solved: in memory up to a budget,
the rest on disk beside the output (:class:`OffsetStore`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from loraclr.io.safe import owner_tag

OFFSETS_PREFIX = "loraclr-offsets-"


class OffsetStore(MutableMapping):
    """The solved offsets D (out, in) by layer key: in memory up to ``max_bytes`` in all, the rest in a
    temporary folder under ``parent`` (one safetensors file per layer, read back on access) that is removed
    with the store (:meth:`close`, or when it is garbage-collected).

    Why: a merge keeps every offset until all stages are solved (the UNet's feature runs need the base UNet),
    and the offsets are as large as the targeted weights: ~7.5 GB in fp32 for SDXL, next to a 14 GB fp32
    pipeline. ``max_bytes=None`` keeps everything in memory.
    """

    def __init__(self, max_bytes: int | None = None, parent: str | Path | None = None):
        self.max_bytes, self.parent = max_bytes, parent
        self._mem: dict[str, Tensor] = {}
        self._files: dict[str, Path] = {}
        self._order: dict[str, None] = {}  # insertion order of all keys
        self._bytes = 0
        self._written = 0  # spill files written (names them)
        self._dir: tempfile.TemporaryDirectory | None = None

    def __setitem__(self, key: str, value: Tensor) -> None:
        if key in self:  # like a dict: an overwritten key keeps its place
            self._drop(key)
        size = value.numel() * value.element_size()
        if self.max_bytes is None or self._bytes + size <= self.max_bytes:
            self._mem[key] = value
            self._bytes += size
        else:
            if self._dir is None:
                if self.parent is not None:
                    Path(self.parent).mkdir(parents=True, exist_ok=True)
                self._dir = tempfile.TemporaryDirectory(prefix=OFFSETS_PREFIX + owner_tag(), dir=self.parent)
            self._written += 1
            path = Path(self._dir.name) / f"{self._written:06d}.safetensors"
            save_file({"offset": value.detach().contiguous()}, str(path))
            self._files[key] = path
        self._order[key] = None

    def __getitem__(self, key: str) -> Tensor:
        if key in self._mem:
            return self._mem[key]
        if key in self._files:
            return load_file(str(self._files[key]))["offset"]
        raise KeyError(key)

    def _drop(self, key: str) -> None:
        if key in self._mem:
            v = self._mem.pop(key)
            self._bytes -= v.numel() * v.element_size()
        elif key in self._files:
            self._files.pop(key).unlink(missing_ok=True)
        else:
            raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        self._drop(key)
        del self._order[key]

    def __iter__(self):
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    @property
    def spilled(self) -> int:
        """Layers kept on disk."""
        return len(self._files)

    def close(self) -> None:
        """Remove the spilled files (the in-memory offsets stay)."""
        for k in list(self._files):
            del self[k]
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def default_offset_budget(pipe) -> int | None:
    """How many bytes of offsets a merge keeps in memory: what is left of half the machine's memory after
    the model's weights (SD 1.5 in fp32 on a 16 GB machine: ~3.8 GB, more than all its offsets; SDXL in fp32 on
    23 GB: none, so ~7.5 GB of offsets wait on disk). None (everything in memory) where the memory size is
    unknown."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep everything in memory
        return None
    weights = sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                  for p in c.parameters())
    return max(0, ram // 2 - weights)
