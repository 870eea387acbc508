"""Shared fixtures: tiny SD1 / SDXL pipelines built from configs (no downloads), session-scoped.

Tests must not modify the session pipelines in place; use ``copy.deepcopy`` or the ``fresh_*`` builders.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from loraclr.models import build_components, build_pipeline

ROOT = Path(__file__).resolve().parents[1]


def load_script(rel: str, name: str):
    """Import a repo script (``bench/*.py``, ``scripts/*.py``; path relative to the repo root) as module ``name``,
    registered in ``sys.modules`` (dataclasses look their module up there). Each call executes it afresh."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def script():
    """``script(rel, name)``: :func:`load_script` for tests."""
    return load_script


@pytest.fixture(scope="session")
def tiny_sd1():
    return build_pipeline("sd1", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    return build_pipeline("sdxl", "tiny", seed=0)


@pytest.fixture(scope="session")
def meta_sd15():
    """Real-shaped SD 1.5 components on the meta device (names and shapes only)."""
    return build_components("sd1", "real", device="meta", with_vae=False)


@pytest.fixture(scope="session")
def meta_sdxl():
    """Real-shaped SDXL components on the meta device (names and shapes only)."""
    return build_components("sdxl", "real", device="meta", with_vae=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
