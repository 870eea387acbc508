"""The local executor: every stage in this process, in order; each stage collects every concept's features in
one pass (spatial ones spilled beside the output), then solves its layers one at a time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import MutableMapping
from pathlib import Path

from loraclr.executors.job import MergeJob, Stage, feature_bars, plain_problems, solve_problems
from loraclr.features.collect import spill_directory


class LocalExecutor:
    def __init__(self, job: MergeJob, *, progress: bool = True, spill_parent: str | Path | None = None):
        self.job, self.progress, self.spill_parent = job, progress, spill_parent
        self.update, self._close_bars = feature_bars(progress)

    def run_stage(self, stage: Stage, offsets: MutableMapping, reports: dict[str, dict],
                  timings: dict[str, float]) -> list[str]:
        job = self.job
        before = set(offsets)
        if stage.collect is None:
            t = time.perf_counter()
            solve_problems(plain_problems(job.pipe, job.concepts, list(stage.keys)), job.spec, job.config,
                           stage.name, self.progress, reports, len(stage.keys), offsets)
            timings["solve"] += time.perf_counter() - t
            return [k for k in offsets if k not in before]
        with spill_directory(self.spill_parent) if stage.spill else contextlib.nullcontext() as spill:
            t = time.perf_counter()
            kw = {"spill_dir": spill} if stage.spill else {}
            feats = stage.collect(job.pipe, job.concepts, job.table, job.recipe.features, self.update, **kw)
            timings["features"] += time.perf_counter() - t
            t = time.perf_counter()
            solve_problems(feats.problems(), job.spec, job.config, stage.name, self.progress, reports,
                           len(feats.keys), offsets)
            timings["solve"] += time.perf_counter() - t
        return [k for k in offsets if k not in before]

    def fused(self, keys: list[str]) -> None:
        """Nothing to do: the driver's model is the one the next stage reads."""

    def workers(self) -> list[dict]:
        return []

    def close(self) -> None:
        self._close_bars()


def make(settings, job: MergeJob, *, progress: bool = True, spill_parent=None) -> LocalExecutor:
    return LocalExecutor(job, progress=progress, spill_parent=spill_parent)
