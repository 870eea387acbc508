"""Merge methods: pure per-layer tensor functions found by name (see :mod:`loraclr.merge.api`)."""

from loraclr.merge.api import LayerProblem, LayerResult, MergeMethod, get_method, register

__all__ = ["LayerProblem", "LayerResult", "MergeMethod", "get_method", "register"]
