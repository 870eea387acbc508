"""The Ray executor: a merge's feature runs and per-layer solves as tasks on a Ray cluster (docs/distributed.md).

What runs where (every task runs the local path's code, :mod:`loraclr.executors.job`):

- workers: ``executor.workers`` actors (:class:`Worker`), each loading the base model and every LoRA once with
  :func:`~loraclr.executors.job.load_job`, as the driver does; Ray restarts a worker whose process dies and
  retries its tasks (``executor.max_retries``).
- features: one task per concept and stage; it runs the stage's collector on that one concept over all of the
  stage's layers and returns one object per layer (rows, row count, Gram statistics when kept; layers fed one
  tensor share one), stored in the object store of the worker's node (or as files in ``executor.shared_dir``).
  The driver holds references only.
- solves: one task per layer; Ray brings that layer's N concept objects to the worker, which rebuilds the
  layer's problem against its own copy of the model (W0, the concepts' deltas) and solves it as the local
  executor does.
- the driver: receives each offset and report, one layer at a time, into its :class:`~loraclr.offsets.OffsetStore`;
  after the text-encoder stage it fuses those offsets and hands the workers references to them, which they fuse
  before their next feature run (so the UNet stages see the merged text encoder, as locally); then it exports.

Peak memory per worker: one model and its LoRAs, plus one concept's features of one stage (a feature task) or
one layer's N concepts' features (a solve); each task returns its process's peak RSS, reported per worker.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayError, RayTaskError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loraclr.executors import ExecutorError
from loraclr.executors.job import (
    MergeJob,
    Stage,
    feature_bars,
    fuse,
    load_job,
    plain_problems,
    solve_problems,
)
from loraclr.features.collect import SPILL_PREFIX, concept_features, features_from
from loraclr.io.safe import owner_tag
from loraclr.models import find_module
from loraclr.recipe import ExecutorSettings, Recipe

log = logging.getLogger(__name__)

FAULT_ENV = "LORACLR_FAULT_INJECT"
# what a local merge reports as a user error; a task failing with one of these re-raises it as it is
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError)


class InjectedFault(RuntimeError):
    """Raised by :func:`inject_fault` in ``raise`` mode; the only exception Ray retries (others are
    deterministic: a retry would fail the same way)."""


def inject_fault(spec: str | None, task: str) -> None:
    """Fault injection for tests, from :data:`FAULT_ENV` on the driver: ``PATTERN:MODE[:MARKER]``. When ``task``
    (``load/<worker>``, ``features/<stage>/<concept>``, ``solve/<stage>/<layer key>``) matches the fnmatch
    PATTERN: ``exit`` ends this worker process at once, ``raise`` raises :class:`InjectedFault`, ``hang`` sleeps
    five minutes (for a test that kills the process from outside). With MARKER the fault fires once, in the
    first process that creates that file (it holds the process id); without, every time."""
    if not spec:
        return
    pattern, _, rest = spec.partition(":")
    mode, _, marker = rest.partition(":")
    if not fnmatch.fnmatchcase(task, pattern):
        return
    if marker:
        tmp = f"{marker}.{os.getpid()}"
        Path(tmp).write_text(str(os.getpid()))
        try:
            os.link(tmp, marker)  # atomic: exactly one process creates it, and it is complete when seen
        except FileExistsError:
            return
        finally:
            os.unlink(tmp)
    log.warning("fault injected at %s (%s)", task, mode)
    if mode == "exit":
        os._exit(1)
    if mode == "hang":
        time.sleep(300)
        return
    raise InjectedFault(f"fault injected at {task}")


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class Worker:
    """One worker process (a Ray actor): the merge's inputs loaded once, then feature and solve tasks."""

    def __init__(self, recipe: Recipe, index: int, threads: int, fault: str | None):
        torch.set_num_threads(threads)
        self.index, self.fault, self.tasks = index, fault, 0
        inject_fault(fault, f"load/{index}")
        self.job = load_job(recipe)
        self.fused_keys: tuple[str, ...] = ()

    def stats(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "threads": torch.get_num_threads(), "tasks": self.tasks, "peak_rss_mb": _peak_rss_mb()}

    def _fuse(self, fused: list[tuple[str, ray.ObjectRef]]) -> None:
        """Add the driver's fused offsets (the text encoder's) to this copy of the model, once; a restarted
        worker starts from the base model again and fuses them anew."""
        keys = tuple(k for k, _ in fused)
        if keys == self.fused_keys:
            return
        if self.fused_keys:
            raise RuntimeError(f"worker {self.index}: asked to fuse {len(keys)} layers over {len(self.fused_keys)} "
                               "fused before; a merge fuses once, between the text encoder and the UNet stages")
        for k, ref in fused:  # one layer at a time
            fuse(self.job.pipe, {k: ray.get(ref)}, [k])
        self.fused_keys = keys

    def features(self, stage: Stage, i: int, fused: list, shared: str | None) -> tuple:
        """Concept ``i``'s features for every layer of ``stage``: one object (or file in ``shared``) per layer,
        None for a layer whose rows are another's (siblings fed one tensor, e.g. q / k / v: stored once), then
        this process's stats with ``same_rows`` {layer: the layer whose object holds its rows}."""
        self.tasks += 1
        job = self.job
        c = job.concepts[i]
        inject_fault(self.fault, f"features/{stage.name}/{c.name}")
        self._fuse(fused)
        feats = stage.collect(job.pipe, [c], job.table, job.recipe.features, None, keys=list(stage.keys))
        out: list[Any] = [concept_features(feats, 0, k) for k in stage.keys]
        first: dict[int, str] = {}  # id of a rows tensor -> the first layer holding it (all alive in `out`)
        same = {}
        for j, (k, f) in enumerate(zip(stage.keys, out, strict=True)):
            owner = first.setdefault(id(f[k]), k)
            if owner != k:  # one tensor: the same rows, row count and Gram statistics
                same[k], out[j] = owner, None
        if shared:
            folder = Path(shared) / stage.name / f"concept{i}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, f in enumerate(out):
                if f is not None:
                    path = folder / f"{j:06d}.safetensors"
                    save_file({k: v.contiguous() for k, v in f.items()}, str(path))
                    out[j] = str(path)
        return (*out, {**self.stats(), "same_rows": same})

    def solve(self, stage: Stage, key: str, owners: list[str], *features) -> tuple:
        """One layer: its problem from the N concepts' features (``features[i]``: concept i's, stored under
        the layer ``owners[i]``; none for a feature-free method) and this worker's model, solved as locally;
        returns (offset (out, in), report, stats)."""
        self.tasks += 1
        job = self.job
        inject_fault(self.fault, f"solve/{stage.name}/{key}")
        if stage.collect is None:
            problems = plain_problems(job.pipe, job.concepts, [key])
        else:
            rows = [load_file(f) if isinstance(f, str) else f for f in features]
            rows = [{key + k[len(o):]: v for k, v in r.items()} for r, o in zip(rows, owners, strict=True)]
            problems = features_from(job.pipe, stage.name, [key], job.concepts, rows).problems()
        reports: dict[str, dict] = {}
        offsets = solve_problems(problems, job.spec, job.config, stage.name, False, reports, 1)
        return offsets[key], reports[key], self.stats()


def assign_solves(shapes: list[tuple[int, int]], n_workers: int) -> list[int]:
    """A worker per layer, longest first to the least-loaded worker, by an estimate of the solve's cost from the
    weight's shape (out, in): in x (in + out), the Gram and the solve in input space. Actors run their tasks in
    order, so a static round-robin piles every layer of one kind (e.g. each block's ``ff.net.2``) onto one
    worker when a block has as many layers as there are workers."""
    cost = [n_in * (n_out + n_in) for n_out, n_in in shapes]
    loads = [0.0] * n_workers
    worker = [0] * len(shapes)
    for j in sorted(range(len(shapes)), key=lambda j: -cost[j]):
        w = loads.index(min(loads))
        worker[j] = w
        loads[w] += cost[j]
    return worker


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_reachable(address: str) -> None:
    """Ray waits minutes for an address where nothing listens; fail in seconds instead."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # a ray:// or other form: Ray parses it
    host = host.removeprefix("ray://")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise ExecutorError(f"ray executor: cannot reach the Ray cluster at {address}: {e}; start it with "
                            "`ray start --head` there, or leave executor.address at 'local'") from None


def _connect(settings: ExecutorSettings, progress: bool) -> bool:
    """Join or start Ray as ``settings.address`` says; True when this merge started it (and stops it)."""
    if ray.is_initialized():
        return False
    local = settings.address == "local"
    if not local and settings.address != "auto":
        _check_reachable(settings.address)
    try:
        quiet = {} if progress else {"log_to_driver": False, "logging_level": logging.ERROR}
        if local:
            # address "local": a new instance even where `ray start` left a cluster that ray.init would join
            ray.init(address="local", num_cpus=settings.workers * settings.cpus_per_worker,
                     include_dashboard=False, **quiet)
        else:
            ray.init(address=settings.address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if local:
            raise ExecutorError(f"ray executor: could not start a local Ray instance: {_first_line(e)}") from None
        # a cluster started by `ray start` may require token authentication, which a driver only uses when told
        raise ExecutorError(f"ray executor: could not join the Ray cluster at {settings.address}: {_first_line(e)} "
                            "(a cluster with token authentication needs RAY_AUTH_MODE=token here too)") from None
    return True


class RayExecutor:
    def __init__(self, settings: ExecutorSettings, job: MergeJob, *, progress: bool = True):
        self.settings, self.job, self.progress = settings, job, progress
        self.update, self._close_bars = feature_bars(progress)
        self.actors: list = []
        self._stats: dict[int, dict] = {}  # pid -> the latest stats of that process
        self._fused: list[tuple[str, ray.ObjectRef]] = []
        self._stage_refs: dict[str, ray.ObjectRef] = {}  # offsets of a fuse_now stage, for the workers to fuse
        self._shared: str | None = None
        t = time.perf_counter()
        self._started = _connect(settings, progress)
        try:
            need = settings.workers * settings.cpus_per_worker
            have = ray.cluster_resources().get("CPU", 0)
            if have < need:
                raise ExecutorError(f"ray executor: the cluster has {have:g} CPUs, {settings.workers} workers x "
                                    f"{settings.cpus_per_worker} CPUs need {need}; lower executor.workers")
            if settings.shared_dir:
                Path(settings.shared_dir).mkdir(parents=True, exist_ok=True)
                self._shared = tempfile.mkdtemp(prefix=SPILL_PREFIX + owner_tag(), dir=settings.shared_dir)
            worker = ray.remote(Worker).options(
                num_cpus=settings.cpus_per_worker, max_restarts=settings.max_retries,
                max_task_retries=settings.max_retries,
            )
            fault = os.environ.get(FAULT_ENV)
            self.actors = [worker.remote(job.recipe, i, settings.cpus_per_worker, fault)
                           for i in range(settings.workers)]
            for i, a in enumerate(self.actors):
                self._record(self._get(a.stats.remote(), f"load/{i} (loading the base model and LoRAs)"))
        except BaseException:
            self.close()
            raise
        self._start_s: float | None = time.perf_counter() - t

    # --- results and failures ---

    def _get(self, ref, task: str):
        try:
            return ray.get(ref)
        except RayTaskError as e:
            if isinstance(e.cause, USER_ERRORS):
                raise e.cause from None  # what a local merge would say
            cause = e.cause if e.cause is not None else e
            raise ExecutorError(f"ray executor: task {task} failed: {type(cause).__name__}: "
                                f"{_first_line(cause)}") from None
        except RayError as e:
            raise ExecutorError(f"ray executor: task {task} failed after {self.settings.max_retries} retries: "
                                f"{type(e).__name__}: {_first_line(e)}") from None

    def _record(self, stats: dict) -> None:
        self._stats[stats["pid"]] = stats

    # --- the executor ---

    def run_stage(self, stage: Stage, offsets: MutableMapping, reports: dict[str, dict],
                  timings: dict[str, float]) -> list[str]:
        if self._start_s is not None:
            timings["workers"] = self._start_s
            self._start_s = None
        keys, n_workers = list(stage.keys), len(self.actors)
        names = [c.name for c in self.job.concepts]
        feats: list[list] = []  # [concept][layer] -> reference
        same_rows: list[dict[str, str]] = []  # [concept]: layer -> the layer holding its rows
        if stage.collect is not None:
            same_rows = [{} for _ in names]
            t = time.perf_counter()
            if self.update:
                self.update(stage.name, 0, len(names))
            pending = {}
            for i in range(len(names)):
                refs = self.actors[i % n_workers].features.options(
                    num_returns=len(keys) + 1, retry_exceptions=[InjectedFault]).remote(
                    stage, i, self._fused, self._shared)
                feats.append(refs[:-1])
                pending[refs[-1]] = i
            while pending:  # a task's returns are ready together: its stats mean its features are stored
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready)
                stats = self._get(ready, f"features/{stage.name}/{names[i]}")
                same_rows[i] = stats.pop("same_rows")
                self._record(stats)
                if self.update:
                    self.update(stage.name, len(names) - len(pending), len(names))
            timings["features"] += time.perf_counter() - t
        t = time.perf_counter()
        index = {k: j for j, k in enumerate(keys)}
        shapes = [tuple(find_module(self.job.pipe, k).weight.flatten(1).shape) for k in keys]
        assigned = assign_solves(shapes, n_workers)
        calls = []
        for j, key in enumerate(keys):
            owners = [same.get(key, key) for same in same_rows]
            calls.append(self.actors[assigned[j]].solve.options(num_returns=3, retry_exceptions=[InjectedFault])
                         .remote(stage, key, owners, *(f[index[o]] for f, o in zip(feats, owners, strict=True))))
        del feats  # each solve task holds its layer's features until it is done; then the store frees them
        bar = tqdm(total=len(keys), desc=f"solve ({stage.name}, {self.job.spec.name})", unit="layer",
                   disable=not self.progress)
        for j, key in enumerate(keys):
            (off, rep, stats), calls[j] = calls[j], None  # a layer's results leave the store once taken
            task = f"solve/{stage.name}/{key}"
            offsets[key] = self._get(off, task)  # one layer at a time: the OffsetStore spills beyond its budget
            reports[key] = self._get(rep, task)
            self._record(self._get(stats, task))
            if stage.fuse_now:
                self._stage_refs[key] = off
            bar.update()
        bar.close()
        timings["solve"] += time.perf_counter() - t
        return keys

    def fused(self, keys: list[str]) -> None:
        self._fused = [(k, self._stage_refs.pop(k)) for k in keys]

    def workers(self) -> list[dict[str, Any]]:
        out = sorted(self._stats.values(), key=lambda s: (s["worker"], s["pid"]))
        return [*out, {"worker": "driver", "pid": os.getpid(), "peak_rss_mb": _peak_rss_mb()}]

    def close(self) -> None:
        self._close_bars()
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except RayError:  # already gone
                pass
        self.actors = []
        self._fused, self._stage_refs = [], {}
        if self._shared:
            shutil.rmtree(self._shared, ignore_errors=True)
            self._shared = None
        if self._started:
            ray.shutdown()
            self._started = False


def make(settings: ExecutorSettings, job: MergeJob, *, progress: bool = True, spill_parent=None) -> RayExecutor:
    return RayExecutor(settings, job, progress=progress)
