"""Executors: where a merge's per-concept feature runs and per-layer solves run, chosen by name.

``local`` (the default): everything in this process, in order (:mod:`loraclr.executors.local`).
``ray``: feature runs and solves as tasks on a Ray cluster, local or remote (:mod:`loraclr.executors.ray`;
``pip install -e '.[ray]'``; docs/distributed.md).

Every executor (:class:`loraclr.executors.job.Executor`) runs the same code (:mod:`loraclr.executors.job`) on
one :class:`~loraclr.executors.job.Stage` at a time and fills the driver's offsets and reports;
:mod:`loraclr.merging` decides the order of the stages and what is fused when. An executor's module is imported only when it is used, so the optional dependency of
one never affects another.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the recipe reads this registry, and the job imports the recipe
    from loraclr.executors.job import Executor, MergeJob


class ExecutorError(RuntimeError):
    """A merge that cannot finish where it runs (a worker lost for good, the cluster unreachable); the
    message names the task or address and the cause."""


@dataclass(frozen=True)
class ExecutorKind:
    """A registered executor. module: imported when the executor is used; it defines
    ``make(settings, job, *, progress, spill_parent) -> Executor``. needs / extra: the package it imports
    that a plain install lacks, and the extra that installs it."""

    name: str
    module: str
    summary: str
    needs: str | None = None
    extra: str | None = None


EXECUTORS: dict[str, ExecutorKind] = {
    k.name: k
    for k in (
        ExecutorKind("local", "loraclr.executors.local", "in this process, stage by stage (the default)"),
        ExecutorKind("ray", "loraclr.executors.ray", "feature runs and per-layer solves as tasks on a Ray cluster",
                     needs="ray", extra="ray"),
    )
}


def get_executor(name: str) -> ExecutorKind:
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ValueError(f"unknown executor {name!r}; choose one of {sorted(EXECUTORS)}") from None


def open_executor(settings, job: MergeJob, *, progress: bool = True, spill_parent=None) -> Executor:
    """The executor ``settings.kind`` names (:class:`loraclr.recipe.ExecutorSettings`), ready for
    :meth:`Executor.run_stage`; close it when the merge is done or failed."""
    kind = get_executor(settings.kind)
    try:
        module = importlib.import_module(kind.module)
    except ModuleNotFoundError as e:
        if kind.needs is None or e.name != kind.needs:
            raise
        raise ExecutorError(f"the {kind.name} executor needs {kind.needs}: pip install -e '.[{kind.extra}]'") from None
    return module.make(settings, job, progress=progress, spill_parent=spill_parent)


__all__ = ["EXECUTORS", "ExecutorError", "ExecutorKind", "get_executor", "open_executor"]
