"""Safe file handling: atomic writes, finiteness checks, output-path checks, and guarded loading.

Nothing here knows about LoRA layouts; it is the part of :mod:`loraclr.io` that touches the file system.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- temporary files that name their owner -----------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def owner_tag() -> str:
    """``HOST.PID.``: put into the names of temporary files and folders beside an output, so that a later run
    can tell one left by a killed process (:func:`sweep_stale`) from one that a running process still writes."""
    return f"{_host()}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(folder: str | os.PathLike, prefixes: tuple[str, ...]) -> list[Path]:
    """Remove the entries of ``folder`` named ``PREFIX + HOST.PID.*`` (see :func:`owner_tag`) whose process on
    this host is gone: what a killed run left behind. Entries of other hosts (a shared file system) and of
    live processes stay. Returns what was removed; each is logged."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _host()
    removed = []
    for entry in folder.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        m = re.match(r"([A-Za-z0-9]+)\.(\d+)\.", entry.name[len(prefix):])
        if m is None or m.group(1) != host or _process_alive(int(m.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            log.info("removed %s, left behind by process %s that is gone", entry, m.group(2))
            removed.append(entry)
    return removed


def atomic_prefixes(path: Path) -> tuple[str, str]:
    """Name prefixes of :func:`atomic_write`'s temporary output and of the old output it moves aside."""
    return f".{path.name}.old.", f".{path.name}."


def _plain_modes(tmp: Path) -> None:
    """Give every file written under ``tmp`` at least the mode a plain open() gives (0644 under umask 022):
    safetensors' save_file, and so diffusers' save_pretrained, create files 0600 (through mkstemp)."""
    readable = 0o666 & ~_umask()
    files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        mode = f.stat().st_mode & 0o777
        if mode | readable != mode:
            os.chmod(f, mode | readable)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``path``; rename it onto ``path`` on success.

    On any error (Ctrl-C included) the temporary file (or folder) is removed and ``path`` is left as it was, so
    a crash or a bad input never leaves a half-written output; what a killed process left beside ``path`` is
    removed by the next write to it (:func:`sweep_stale`). The caller may create a file or a directory at the
    yielded path; every file in it ends up with the mode a plain open() gives.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: the output folder {parent} does not exist; create it first")
    old_prefix, tmp_prefix = atomic_prefixes(path)
    sweep_stale(parent, (old_prefix, tmp_prefix))
    fd, tmp_name = tempfile.mkstemp(prefix=tmp_prefix + owner_tag(), suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates it (as a file or a folder)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: nothing was written")
        _plain_modes(tmp)
        if path.is_dir() and tmp.is_dir():
            # os.replace cannot swap folders portably: move the old one aside first, then drop it.
            old = Path(tempfile.mkdtemp(prefix=old_prefix + owner_tag(), dir=parent))
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def check_finite(tensors: dict[str, Tensor], source: str) -> None:
    """Raise ``ValueError`` naming the first keys whose tensors hold NaN or inf."""
    bad = []
    for key, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point() and t.device.type != "meta":
            if not bool(torch.isfinite(t).all()):
                n_nan = int(torch.isnan(t).sum())
                n_inf = int(torch.isinf(t).sum())
                bad.append(f"{key} ({n_nan} NaN, {n_inf} inf of {t.numel()})")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{source}: non-finite values in {shown}; the file is corrupt or the training diverged")


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike] | None = None) -> Path:
    """Refuse an output that is (or lies inside) an input, or whose folder cannot be written."""
    out = Path(out)
    resolved = out.resolve()
    for inp in inputs or []:
        inp_r = Path(inp).resolve()
        if resolved == inp_r or inp_r in resolved.parents:
            raise ValueError(f"{out}: the output would overwrite or go inside the input {inp}; choose another path")
        if resolved in inp_r.parents and resolved.is_dir():
            # an output folder is replaced as a whole: the input inside it would be deleted
            raise ValueError(f"{out}: the output folder holds the input {inp} and would replace it; choose another path")
    parent = resolved.parent
    if not parent.exists():
        raise FileNotFoundError(f"{out}: the output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"{out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: the folder {parent} is not writable; choose another output path")
    if resolved.exists() and resolved.is_dir() != (out.suffix == ""):
        kind = "a folder" if resolved.is_dir() else "a file"
        raise ValueError(f"{out}: already exists as {kind}; remove it or choose another path")
    return out


def unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors with no two sharing memory (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        t = t.contiguous()
        span = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and span in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[k] = t
    return out


# --- guarded reading -------------------------------------------------------------------------------------


def is_safetensors(path: Path) -> bool:
    """True when the file starts like a safetensors file (8-byte header length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; one clear error for broken files."""
    from safetensors import safe_open

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"header of {n} bytes but the file has only {size}")
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError types
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt: download it again"
        ) from e
    return tensors, metadata


def read_pickle(path: Path, allow_pickle: bool) -> Any:
    """Load a torch pickle weights-only (no code is executed), and only when the user opted in."""
    if not allow_pickle:
        raise ValueError(
            f"{path}: is a pickle file, which can run code when loaded; refused. Convert it to safetensors, "
            "or pass allow_pickle=True (CLI: --allow-pickle) to load its tensors weights-only"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: could not be loaded weights-only ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is truncated, corrupt, or holds objects other than tensors"
        ) from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from e
