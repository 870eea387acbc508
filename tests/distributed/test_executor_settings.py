"""The recipe's executor section, its flags, the registry's message when Ray is missing, and the fault hook."""

from __future__ import annotations

import sys

import pytest
import yaml

from loraclr.commands.merge import add_arguments, build_recipe
from loraclr.executors import EXECUTORS, ExecutorError, open_executor
from loraclr.recipe import ExecutorSettings, dump_recipe, load_recipe, recipe_from_dict

BASE = {"base": "mini", "concepts": [{"name": "a", "lora": "a.safetensors", "trigger": "sks"}]}


def _recipe(tmp_path, **extra):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return path


def test_default_is_local_and_the_section_round_trips(tmp_path):
    r = load_recipe(_recipe(tmp_path))
    assert r.executor == ExecutorSettings() and r.executor.kind == "local"
    r = load_recipe(_recipe(tmp_path, executor={"kind": "ray", "address": "auto", "workers": 3,
                                                "shared_dir": "shared"}))
    assert (r.executor.kind, r.executor.address, r.executor.workers) == ("ray", "auto", 3)
    assert r.executor.shared_dir == str((tmp_path / "shared").resolve())  # relative to the recipe, like inputs
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)), source="x", root=tmp_path)
    assert again.executor == r.executor
    assert load_recipe(_recipe(tmp_path, executor="ray")).executor == ExecutorSettings(kind="ray")


@pytest.mark.parametrize("section, match", [
    ({"kind": "ray", "adress": "auto"}, r"executor: unknown field\(s\) \['adress'\]"),
    ({"kind": "dask"}, r"executor.kind: unknown executor 'dask'; choose one of \['local', 'ray'\]"),
    ({"workers": 0}, "executor.workers must be an integer >= 1, got 0"),
    ({"cpus_per_worker": "two"}, "field 'cpus_per_worker' must be an integer"),
    ({"max_retries": -1}, "executor.max_retries must be an integer >= 0"),
])
def test_bad_sections_name_the_field(tmp_path, section, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(_recipe(tmp_path, executor=section))


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_flags_override_the_recipe(tmp_path):
    recipe = str(_recipe(tmp_path, executor={"kind": "local", "address": "auto", "workers": 3}))
    assert build_recipe(_args([recipe, "-o", "out"])).executor.kind == "local"
    r = build_recipe(_args([recipe, "-o", "out", "--ray"]))
    assert (r.executor.kind, r.executor.address, r.executor.workers) == ("ray", "auto", 3)  # address kept
    r = build_recipe(_args([recipe, "-o", "out", "--ray", "10.0.0.5:6379", "--ray-workers", "4"]))
    assert (r.executor.kind, r.executor.address, r.executor.workers) == ("ray", "10.0.0.5:6379", 4)


def test_missing_ray_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "loraclr.executors.ray", raising=False)
    with pytest.raises(ExecutorError, match=r"^the ray executor needs ray: pip install -e '\.\[ray\]'$"):
        open_executor(ExecutorSettings(kind="ray"), job=None)
    assert set(EXECUTORS) == {"local", "ray"}


def test_fault_hook_fires_once_per_marker_and_only_where_it_matches(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from loraclr.executors.ray import InjectedFault, inject_fault

    marker = tmp_path / "m"
    spec = f"solve/spatial/*:raise:{marker}"
    inject_fault(spec, "solve/text_encoder/x")  # no match: nothing
    inject_fault(None, "solve/spatial/x")
    assert not marker.exists()
    with pytest.raises(InjectedFault, match="fault injected at solve/spatial/x"):
        inject_fault(spec, "solve/spatial/x")
    assert marker.read_text().isdigit() and [p.name for p in tmp_path.iterdir()] == ["m"]
    inject_fault(spec, "solve/spatial/y")  # fired once already
    with pytest.raises(InjectedFault):  # without a marker: every time
        inject_fault("solve/*:raise", "solve/spatial/y")
