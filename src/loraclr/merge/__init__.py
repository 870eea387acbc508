"""Merge methods: pure per-layer tensor functions found by name (see :mod:`loraclr.merge.api`).

Importing the package registers the built-in methods (their modules call :func:`register` at import), so
the registry is complete wherever any part of ``loraclr.merge`` is used.
"""

from loraclr.merge import baselines, contrastive, lstsq  # noqa: F401  (registers the built-in methods)
from loraclr.merge.api import LayerProblem, LayerResult, MergeMethod, all_methods, get_method, register

__all__ = ["LayerProblem", "LayerResult", "MergeMethod", "all_methods", "get_method", "register"]
