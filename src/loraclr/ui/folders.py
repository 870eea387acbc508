"""Which files the page may read and write: only inside the folders the user named (``--folder``).

Every path typed into the page or taken from a file list goes through :meth:`Folders.resolve`, which follows
symlinks before checking, so ``../`` or a link cannot lead outside. The built-in world's assets are readable
(the shipped concept LoRAs and the ``mini`` base), never written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

WORLD_ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"
LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# subfolders of the work folder (the first --folder)
MERGES, IMAGES, UPLOADS, RECIPES, SCORES = "merges", "images", "uploads", "recipes", "scores"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def display(path: str | Path) -> str:
    """A path as the page shows it and writes it into commands: relative to the folder `loraclr ui` was started
    in when it lies inside it (the commands then run as shown from there), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


@dataclass(frozen=True)
class Folders:
    """roots: the folders the user named, resolved; the first is the work folder, where outputs go."""

    roots: tuple[Path, ...]

    @classmethod
    def create(cls, folders: list[str | Path]) -> Folders:
        if not folders:
            raise ValueError("name at least one folder (--folder DIR)")
        roots = []
        for f in folders:
            p = Path(f).expanduser()
            if p.exists() and not p.is_dir():
                raise ValueError(f"--folder {f}: not a folder")
            p.mkdir(parents=True, exist_ok=True)
            roots.append(p.resolve())
        work = roots[0]
        for sub in (MERGES, IMAGES, UPLOADS, RECIPES, SCORES):
            (work / sub).mkdir(exist_ok=True)
        return cls(tuple(roots))

    @property
    def work(self) -> Path:
        return self.roots[0]

    def readable_roots(self) -> tuple[Path, ...]:
        return (*self.roots, WORLD_ASSETS)

    def resolve(self, path: str | Path, *, write: bool = False) -> Path:
        """``path`` (relative to the current folder, as in the commands the page shows) resolved, if it lies
        inside a named folder (or, for reading, the world's assets); else PermissionError naming the folders."""
        text = str(path).strip()
        if not text:
            raise ValueError("no path given")
        p = Path(text).expanduser()
        p = p.resolve()
        roots = self.roots if write else self.readable_roots()
        if not any(p == r or p.is_relative_to(r) for r in roots):
            shown = ", ".join(str(r) for r in self.roots)
            raise PermissionError(f"{text}: outside the folders this page may {'write' if write else 'read'} "
                                  f"({shown}); start `loraclr ui --folder DIR` to add one")
        return p

    def output(self, sub: str, name: str) -> Path:
        """``<work folder>/<sub>/<name>`` for a plain name typed in the page (no separators, no leading dot)."""
        if not _PLAIN_NAME.match(name or ""):
            raise ValueError(f"{name!r}: not a plain name; use letters, digits, '.', '_' and '-' (at most 100), "
                             "starting with a letter or digit")
        return self.resolve(self.work / sub / name, write=True)

    def list_loras(self, folder: str | Path) -> list[Path]:
        """The LoRA and embedding files directly inside ``folder`` (a named folder or inside one)."""
        d = self.resolve(folder)
        if not d.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found")
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in LORA_SUFFIXES
                      and not p.name.endswith((".embeddings", ".learned_embeds.safetensors")))
