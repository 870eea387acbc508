"""The Ray executor on a local two-CPU cluster: it writes the weights the local merge writes (tiny SD1 and SDXL,
several methods); a worker killed mid-merge or a task that fails once changes nothing; a merge that cannot
finish exits with one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).parents[1] / "features"))
from lora_factory import random_loraset  # noqa: E402

from loraclr.cli import main  # noqa: E402
from loraclr.executors.ray import FAULT_ENV, assign_solves  # noqa: E402
from loraclr.io import save_lora  # noqa: E402
from loraclr.merging import merge  # noqa: E402
from loraclr.recipe import load_recipe  # noqa: E402

TRIGGERS = ["sks man", "zwx dog", "qrt cat"]
METHODS = {
    "converged": {"name": "loraclr", "mode": "converged"},
    "paper": {"name": "loraclr", "mode": "paper"},
    "lstsq": "lstsq",
    "average": "average",
}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with two CPUs: two workers of one CPU each, as CI has two cores."""
    # workers start with OMP_NUM_THREADS=1, like the local reference merges (see local_merges)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _inputs(tmp: Path, pipe, family: str) -> Path:
    """Three concept LoRAs; the third only on attention layers, so some layers have LoRAs of only some concepts
    (each worker collects one concept, but over every layer of the stage)."""
    pipe.save_pretrained(str(tmp / "base"))
    for i in range(3):
        lora = random_loraset(pipe, seed=10 + i, scale=0.1, only=(lambda k: "attn" in k) if i == 2 else None)
        save_lora(lora.layers, tmp / f"c{i}.safetensors", format="kohya", family=family,
                  unet_config=dict(pipe.unet.config))
    return tmp


def _recipe(folder: Path, method: str, **executor) -> Path:
    recipe = {
        "base": "base", "method": METHODS[method],
        "concepts": [{"name": f"c{i}", "lora": f"c{i}.safetensors", "trigger": TRIGGERS[i]} for i in range(3)],
        # fp32 pinned: with bf16 autocast ("auto" on machines with native bf16) a worker's one thread and the
        # local merge's many sum in different orders, and bf16 rounding can make that visible
        "features": {"steps": 2, "max_rows": 256, "precision": "float32"},
        "output": {"rank": 256},
        "executor": executor or "local",
    }
    path = folder / f"{method}-{executor.get('kind', 'local')}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_sd1):
    return _inputs(tmp_path_factory.mktemp("sd1"), tiny_sd1, "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_sdxl):
    return _inputs(tmp_path_factory.mktemp("sdxl"), tiny_sdxl, "sdxl")


@pytest.fixture(scope="module")
def local_merges():
    """The local merge of each (inputs, method), made once."""
    done: dict[tuple[Path, str], Path] = {}

    def get(folder: Path, method: str) -> Path:
        if (folder, method) not in done:
            out = folder / f"local-{method}"
            # in a process set up like a Ray worker (OMP_NUM_THREADS=1, one torch thread): another thread
            # count sums in another order, and on these tiny random problems the converged solve moves far
            # beyond float32 rounding (0.3 relative with 2 threads)
            rc = subprocess.run([sys.executable, "-m", "loraclr", "merge", str(_recipe(folder, method)), "-o",
                                 str(out), "--threads", "1", "--quiet"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            assert rc.returncode == 0, rc.stderr[-2000:]
            done[folder, method] = out
        return done[folder, method]

    return get


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor the merge wrote: the pipeline's weights and the merged LoRA."""
    from safetensors.torch import load_file

    files = sorted((out / "pipeline").rglob("*.safetensors")) + sorted(out.glob("merged_lora_*.safetensors"))
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(f).items()}


def _assert_same_weights(got: Path, want: Path) -> None:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in b)
    assert worst <= 1e-6, worst


def _ray_merge(folder: Path, method: str, out_name: str, **executor) -> Path:
    out = folder / out_name
    # the driver exports (factorises the offsets into the merged LoRA) with one thread, like the reference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        merge(load_recipe(_recipe(folder, method, kind="ray", **executor)), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _check_workers(out: Path, workers: int = 2) -> dict:
    report = json.loads((out / "report.json").read_text())
    entries = report["executor"]["workers"]
    assert report["executor"]["kind"] == "ray"
    assert {e["worker"] for e in entries} == {*range(workers), "driver"}
    assert all(e["peak_rss_mb"] > 50 for e in entries)  # a process holding torch and a model, in MB
    assert all(e["threads"] == 1 for e in entries if e["worker"] != "driver")
    assert set(report["timings_s"]) == {"load", "workers", "features", "solve", "export"}
    return report


# --- same weights as the local merge --------------------------------------------------------------------------


@pytest.mark.parametrize("method", [
    "converged", "average",
    pytest.param("paper", marks=pytest.mark.slow), pytest.param("lstsq", marks=pytest.mark.slow),
])
def test_ray_merge_writes_the_local_weights_sd1(cluster, sd1, local_merges, method):
    want = local_merges(sd1, method)
    got = _ray_merge(sd1, method, f"ray-{method}")
    _assert_same_weights(got, want)
    report = _check_workers(got)
    stages = {r["stage"] for r in report["layers"].values()}
    assert stages == ({"all"} if method == "average" else {"text_encoder", "cross_attention", "spatial"})
    assert not [p for p in sd1.iterdir() if p.name.startswith((".ray-", "loraclr-"))]  # no temporaries left


@pytest.mark.slow  # 15-30 s each on two shared cores; the SD1 tests cover the same path
@pytest.mark.parametrize("method", ["converged", "paper", "lstsq", "average"])
def test_ray_merge_writes_the_local_weights_sdxl(cluster, sdxl, local_merges, method):
    _assert_same_weights(_ray_merge(sdxl, method, f"ray-{method}"), local_merges(sdxl, method))


@pytest.mark.slow
def test_features_through_a_shared_folder(cluster, sd1, local_merges, tmp_path):
    """executor.shared_dir: features travel as files there, which are removed afterwards."""
    shared = tmp_path / "shared"
    got = _ray_merge(sd1, "converged", "ray-shared", shared_dir=str(shared))
    _assert_same_weights(got, local_merges(sd1, "converged"))
    assert shared.is_dir() and not list(shared.iterdir())


# --- faults ----------------------------------------------------------------------------------------------------


def test_worker_killed_mid_merge_gives_the_same_weights(cluster, sd1, local_merges, monkeypatch, tmp_path):
    """SIGKILL of a worker process in the middle of its spatial feature run: Ray restarts the worker (which loads
    the model again and fuses the merged text encoder anew) and retries the task; the weights are the same."""
    marker = tmp_path / "hung"
    monkeypatch.setenv(FAULT_ENV, f"features/spatial/c1:hang:{marker}")
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            if marker.exists():
                killed.append(int(marker.read_text()))
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        got = _ray_merge(sd1, "converged", "ray-killed")
    finally:
        stop.set()
        thread.join()
    assert killed, "the spatial feature task never ran"
    _assert_same_weights(got, local_merges(sd1, "converged"))
    entries = _check_workers(got)["executor"]["workers"]
    pids = [e["pid"] for e in entries]
    assert killed[0] in pids  # the killed process ran tasks before ...
    assert len(pids) == 4  # ... and its worker ran on in a new one: two workers, one restart, the driver


@pytest.mark.slow
@pytest.mark.parametrize("mode, task", [("exit", "solve/text_encoder/*"), ("raise", "features/cross_attention/c2"),
                                        ("raise", "solve/spatial/*")])
def test_injected_failure_is_retried(cluster, sd1, local_merges, monkeypatch, tmp_path, mode, task):
    marker = tmp_path / "fired"
    monkeypatch.setenv(FAULT_ENV, f"{task}:{mode}:{marker}")
    got = _ray_merge(sd1, "converged", f"ray-{mode}-{task.split('/')[0]}")
    assert marker.exists()  # it did fire
    _assert_same_weights(got, local_merges(sd1, "converged"))


def test_merge_that_cannot_finish_exits_with_one_line_and_writes_nothing(cluster, sd1, monkeypatch, capsys):
    """A worker that dies in every solve: once its restarts are spent the merge stops with one line naming the
    task, and nothing is left at the output path or beside it."""
    monkeypatch.setenv(FAULT_ENV, "solve/*:exit")  # no marker: every time
    recipe = _recipe(sd1, "average", kind="ray", max_retries=1)
    out = sd1 / "ray-lost"
    before = sorted(p.name for p in sd1.iterdir())
    assert main(["merge", str(recipe), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("loraclr merge: error: ray executor: task solve/all/") and "after 1 retries" in err, err
    assert not out.exists()
    assert sorted(p.name for p in sd1.iterdir()) == before


def test_unreachable_cluster_is_one_line(sd1, tmp_path):
    """--ray HOST:PORT where nothing listens: one line naming the address, in seconds, nothing written. A fresh
    process, so that no Ray session of this one is reused."""
    recipe = _recipe(sd1, "average")
    out = tmp_path / "out"
    with socket_nobody_listens() as port:
        proc = subprocess.run([sys.executable, "-m", "loraclr", "merge", str(recipe), "-o", str(out), "--quiet",
                               "--ray", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"loraclr merge: error: ray executor: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert not out.exists() and not list(tmp_path.iterdir())


class socket_nobody_listens:
    """A local port that was free a moment ago (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc) -> None:
        return None


def test_solves_are_spread_by_cost_not_by_position():
    # a block of two layers, repeated: round-robin on 2 workers gives every wide layer to worker 1
    shapes = [(320, 320), (1280, 5120)] * 4
    assigned = assign_solves(shapes, 2)
    wide = [assigned[j] for j, s in enumerate(shapes) if s == (1280, 5120)]
    assert sorted(wide) == [0, 0, 1, 1]
    assert sorted(set(assigned)) == [0, 1] and len(assigned) == len(shapes)
    assert assign_solves(shapes, 1) == [0] * len(shapes)
