"""`loraclr merge` then `loraclr generate`, end to end through ``cli.main`` on tiny SD1 and SDXL pipelines
with three concept LoRAs; the merged model is closer to each concept's own LoRA model than naive stacking;
outputs load with diffusers; bad recipes give clear errors and write nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "features"))
from lora_factory import random_loraset, random_token  # noqa: E402

from loraclr.cli import main  # noqa: E402
from loraclr.io import save_lora  # noqa: E402
from loraclr.surgery.hooks import apply_layers  # noqa: E402
from loraclr.surgery.tokens import encode  # noqa: E402

TRIGGERS = ["sks man", "zwx dog", "qrt cat"]


def _setup(tmp: Path, pipe, family: str, method: str = "loraclr") -> tuple[Path, list]:
    pipe.save_pretrained(str(tmp / "base"))
    loras = []
    for i in range(3):
        lora = random_loraset(pipe, seed=10 + i, scale=0.1)  # ||dW|| = 0.1 ||W0|| on every layer
        save_lora(lora.layers, tmp / f"c{i}.safetensors", format="kohya", family=family,
                  unet_config=dict(pipe.unet.config))
        loras.append(lora)
    recipe = {
        "base": "base",
        # converged: the exact solve of the LoRACLR objective (the default paper mode stops after 50 small steps)
        "method": {"name": "loraclr", "mode": "converged"} if method == "loraclr" else method,
        "concepts": [{"name": f"c{i}", "lora": f"c{i}.safetensors", "trigger": TRIGGERS[i]} for i in range(3)],
        "features": {"steps": 2, "max_rows": 256},
        "output": {"rank": 256},  # >= every tiny layer's width: the exported LoRA is exact
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml", loras


def _unet_eps(pipe, prompt: str, layers=None) -> torch.Tensor:
    """The UNet's noise prediction for a prompt at one timestep, with ``layers`` (a LoRA) applied."""
    x = torch.randn(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), apply_layers(pipe, layers or {}):  # text-encoder and UNet layers alike
        states, pooled = encode(pipe, [prompt], pad=True)
        added = None
        if pooled is not None:
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float)}
        return pipe.unet(x, 500, encoder_hidden_states=states, added_cond_kwargs=added).sample


def _check_merge(tmp: Path, family: str, base_pipe, loras, capsys):
    from diffusers import DiffusionPipeline

    out = tmp / "out"
    assert main(["merge", str(tmp / "recipe.yaml"), "-o", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "loraclr"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loraclr.json", "merged_lora_diffusers.safetensors", "merged_lora_kohya.safetensors",
                     "pipeline", "prompts.json", "recipe.yaml", "report.json"]
    assert not [p for p in tmp.iterdir() if p.name.startswith((".out", "loraclr-features"))]  # no leftovers
    report = json.loads((out / "report.json").read_text())
    n_layers = len(loras[0].layers)
    assert len(report["layers"]) == n_layers
    assert {r["stage"] for r in report["layers"].values()} == {"text_encoder", "cross_attention", "spatial"}
    assert set(report["timings_s"]) == {"load", "features", "solve", "export"}
    # per-layer fidelity on each concept's own features: the merge beats the naive sum on average
    for name, fid in report["fidelity"].items():
        assert fid["layers"] == n_layers
        assert fid["merged"] < 0.6 * fid["sum"], (name, fid)
    recipe_back = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe_back["versions"]["torch"] == torch.__version__.split("+")[0] or recipe_back["versions"]["torch"]
    assert recipe_back["features"]["steps"] == 2

    # the pipeline folder loads with plain diffusers
    merged = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    assert type(merged).__name__ == type(base_pipe).__name__

    # independent check on whole-model outputs: text-encoder states and UNet noise predictions on each
    # concept's prompt are closer to the concept's own LoRA model than the naive sum of all three LoRAs
    summed = {}
    for lora in loras:
        for k, v in lora.layers.items():
            summed[k] = summed[k] + v.delta() if k in summed else v.delta()
    from loraclr.lora import DenseDelta

    summed = {k: DenseDelta(v) for k, v in summed.items()}
    numbers = {}
    for i, lora in enumerate(loras):
        prompt = f"photo of a {TRIGGERS[i]}"
        with apply_layers(base_pipe, lora.layers):
            own_states = encode(base_pipe, [prompt])[0]
        with apply_layers(base_pipe, summed):
            sum_states = encode(base_pipe, [prompt])[0]
        merged_states = encode(merged, [prompt])[0]
        own_eps = _unet_eps(base_pipe, prompt, lora.layers)
        sum_eps = _unet_eps(base_pipe, prompt, summed)
        merged_eps = _unet_eps(merged, prompt)

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        numbers[f"c{i}"] = {"te_merged": rel(merged_states, own_states), "te_sum": rel(sum_states, own_states),
                            "eps_merged": rel(merged_eps, own_eps), "eps_sum": rel(sum_eps, own_eps)}
    print(family, "whole-model relative errors:", json.dumps(numbers))
    for n in numbers.values():
        assert n["te_merged"] < n["te_sum"] and n["eps_merged"] < n["eps_sum"], numbers

    # the merged LoRA (rank >= width: exact) on the base equals the merged pipeline, read by diffusers
    base = DiffusionPipeline.from_pretrained(str(tmp / "base"))
    base.load_lora_weights(str(out), weight_name="merged_lora_diffusers.safetensors")
    base.fuse_lora()
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    w_lora = dict(base.unet.named_modules())[key].weight
    w_merged = dict(merged.unet.named_modules())[key].weight
    torch.testing.assert_close(w_lora, w_merged, rtol=1e-4, atol=1e-4)
    return out


def test_merge_and_generate_sd1(tmp_path, tiny_sd1, capsys):
    _, loras = _setup(tmp_path, tiny_sd1, "sd1")
    out = _check_merge(tmp_path, "sd1", tiny_sd1, loras, capsys)
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["concepts"]["c1"]["trigger"] == "zwx dog"
    rc = main(["generate", str(out), "photo of {c0} and {c1}", "{c2}", "-n", "2", "--steps", "2",
               "--grid", str(tmp_path / "grid.png"), "-o", str(tmp_path / "img"), "--quiet"])
    assert rc == 0
    from PIL import Image

    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["000-0.png", "000-1.png", "001-0.png",
                                                                      "001-1.png"]
    assert Image.open(tmp_path / "grid.png").size == (2 * 16, 2 * 16)  # 2 seeds x 2 prompts of 16 px


@pytest.mark.slow  # ~100 s on the shared 2-core machine; the SD1 test covers the same path
def test_merge_and_generate_sdxl(tmp_path, tiny_sdxl, capsys):
    _, loras = _setup(tmp_path, tiny_sdxl, "sdxl")
    out = _check_merge(tmp_path, "sdxl", tiny_sdxl, loras, capsys)
    rc = main(["generate", str(out), "{c0} on a beach", "--steps", "2", "-o", str(tmp_path / "img"), "--quiet"])
    assert rc == 0 and (tmp_path / "img" / "000-0.png").is_file()


def test_learned_tokens_same_name_two_concepts(tmp_path, tiny_sd1):
    """Two LoRAs trained on the same token (and one ED-LoRA) still merge: tokens renamed, embeddings written."""
    from loraclr.io import save_embeddings
    from loraclr.merging import merge
    from loraclr.recipe import load_recipe
    from loraclr.surgery.hooks import cross_attention_modules

    tiny_sd1.save_pretrained(str(tmp_path / "base"))
    n_layers = len(cross_attention_modules(tiny_sd1.unet))
    te_and_cross = lambda k: k.endswith(("attn2.to_k", "attn2.to_v", "attn2.to_out.0", "q_proj", "v_proj"))  # noqa: E731
    # alice: the token travels beside the LoRA (read automatically); bob: a separate embedding file
    save_lora(random_loraset(tiny_sd1, seed=20, only=te_and_cross).layers, tmp_path / "t0.safetensors",
              format="diffusers", family="sd1", tokens=[random_token(tiny_sd1, "<sks>", seed=0)])
    save_lora(random_loraset(tiny_sd1, seed=21, only=te_and_cross).layers, tmp_path / "t1.safetensors",
              format="kohya", family="sd1")
    save_embeddings([random_token(tiny_sd1, "<sks>", seed=1, n_vectors=2)], tmp_path / "sks.safetensors")
    ed = random_loraset(tiny_sd1, seed=30, only=te_and_cross)
    params = {"new_concept_embedding": {"<elsa1>": random_token(tiny_sd1, "<elsa1>", 3, n_layers, True)
                                        .embeddings["text_encoder"]}, "text_encoder": {}, "unet": {}}
    for k, layer in ed.layers.items():
        comp, path = k.split(".", 1)
        params[comp][path + ".lora_down.weight"] = layer.down * layer.scale ** 0.5  # ED-LoRA: alpha = rank
        params[comp][path + ".lora_up.weight"] = layer.up * layer.scale ** 0.5
    torch.save({"params": params}, tmp_path / "elsa.pth")
    recipe = {
        "base": "base", "method": "lstsq", "allow_pickle": True,
        "concepts": [
            {"name": "alice", "lora": "t0.safetensors", "trigger": "<sks> woman"},
            {"name": "bob", "lora": "t1.safetensors", "trigger": "<sks> man", "embeddings": "sks.safetensors"},
            {"name": "carol", "lora": "elsa.pth"},  # trigger = its learned token
        ],
        "features": {"steps": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = merge(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", progress=False)
    pm = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert pm["concepts"]["carol"]["trigger"] == "<carol-elsa1>" and pm["concepts"]["carol"]["layerwise"]
    names = {t["name"] for t in pm["tokens"]}
    assert {"<carol-elsa1>"} <= names
    # both <sks> survive under new names; bob's has two vectors
    assert pm["concepts"]["alice"]["trigger"] == "<alice-sks> woman"
    assert pm["concepts"]["bob"]["trigger"] == "<bob-sks> man"
    assert {"<alice-sks>", "<bob-sks>", "<carol-elsa1>"} == names
    assert [t["vocab"] for t in pm["tokens"] if t["name"] == "<bob-sks>"] == [["<bob-sks>", "<bob-sks-v1>"]]
    assert (tmp_path / "out" / "embeddings").is_dir()
    for fid in summary.fidelity.values():
        assert fid["merged"] < fid["sum"]
    # generation with the layer-wise token goes through the per-layer hook
    rc = main(["generate", str(tmp_path / "out"), "{carol} in a garden", "--steps", "1", "-o",
               str(tmp_path / "img"), "--quiet"])
    assert rc == 0 and (tmp_path / "img" / "000-0.png").is_file()


# --- bad recipes: clear errors, nothing written -----------------------------------------------------------


@pytest.fixture(scope="module")
def bad_setup(tmp_path_factory, tiny_sd1, tiny_sdxl):
    tmp = tmp_path_factory.mktemp("bad")
    tiny_sd1.save_pretrained(str(tmp / "base"))
    lora = random_loraset(tiny_sd1, seed=1, only=lambda k: "attn2" in k)
    save_lora(lora.layers, tmp / "a.safetensors", format="kohya", family="sd1")
    xl = random_loraset(tiny_sdxl, seed=1, only=lambda k: "attn2" in k)
    save_lora(xl.layers, tmp / "xl.safetensors", format="kohya", family="sdxl", unet_config=dict(tiny_sdxl.unet.config))
    save_lora(xl.layers, tmp / "xl_d.safetensors", format="diffusers", family="sdxl")
    return tmp


def _recipe(tmp: Path, name: str, **kw) -> Path:
    r = {"base": "base", "method": "lstsq",
         "concepts": [{"name": "a", "lora": "a.safetensors", "trigger": "sks man"}], "features": {"steps": 1}}
    r.update(kw)
    (tmp / name).write_text(yaml.safe_dump(r))
    return tmp / name


@pytest.mark.parametrize(
    "case, kw, extra, match",
    [
        ("missing", {"concepts": [{"lora": "nope.safetensors", "trigger": "x"}]}, [], "lora file .*nope.safetensors not found"),
        ("method", {"method": "magic"}, [], "unknown merge method 'magic'"),
        ("setting", {"method": {"name": "loraclr", "margn": 1}}, [], r"unknown setting\(s\) \['margn'\]"),
        ("trigger", {"concepts": [{"name": "a", "lora": "a.safetensors"}]}, [], "no trigger"),
        ("bases", {"concepts": [{"name": "a", "lora": "a.safetensors", "trigger": "sks"},
                                {"name": "b", "lora": "xl.safetensors", "trigger": "zwx"}]}, [],
         r"concepts\[1\] \(b\): .*xl.safetensors: the file is an sdxl LoRA \(.*\) but the base model is sd1"),
        ("bases2", {"concepts": [{"name": "a", "lora": "a.safetensors", "trigger": "sks"},
                                 {"name": "b", "lora": "xl_d.safetensors", "trigger": "zwx"}]}, [],
         r"concepts\[1\] \(b\): .*the file is not a sd1 LoRA: .*-> sdxl. Use a LoRA trained for sd1"),
        ("base", {"base": "nowhere"}, [], "base model not found"),
        ("inside", {}, ["inside"], "inside the input"),
        ("cli-method", {}, ["--method", "nonsense"], "unknown merge method 'nonsense'"),
    ],
)
def test_bad_recipes_write_nothing(bad_setup, capsys, case, kw, extra, match):
    tmp = bad_setup
    recipe = _recipe(tmp, f"{case}.yaml", **kw)
    out = tmp / "base" / "merged" if extra[:1] == ["inside"] else tmp / f"out-{case}"
    before = sorted(p.name for p in tmp.iterdir())
    argv = ["merge", str(recipe), "-o", str(out), "--quiet"] + [a for a in extra if a != "inside"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraclr merge: error: ") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(match, err), err
    assert not out.exists()
    assert sorted(p.name for p in tmp.iterdir()) == before  # no temp folders left behind


def test_offsets_spilled_to_disk_merge_like_in_memory(tmp_path, tiny_sd1):
    """A merge whose offsets all go to disk (the large-model path) writes the same weights."""
    from loraclr.merging import merge_model
    from loraclr.recipe import load_recipe

    recipe_path, _ = _setup(tmp_path, tiny_sd1, "sd1")
    recipe = load_recipe(recipe_path)
    mem = merge_model(recipe, progress=False, offsets_max_bytes=None)
    disk = merge_model(recipe, progress=False, spill_parent=tmp_path / "spill", offsets_max_bytes=0)
    assert disk.offsets.spilled == len(disk.offsets) == len(mem.offsets) > 0 and mem.offsets.spilled == 0
    for k in mem.offsets:
        assert torch.equal(mem.offsets[k], disk.offsets[k]), k
    for (name, p), (_, q) in zip(mem.pipe.unet.named_parameters(), disk.pipe.unet.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    disk.offsets.close()
    assert not [p for p in (tmp_path / "spill").iterdir() if p.name.startswith("loraclr-offsets-")]


@pytest.mark.parametrize("case, match", [("truncated", "the file is truncated or corrupt"),
                                         ("nan", "non-finite values in lora_unet_")])
def test_broken_lora_errors_do_not_blame_the_base_model(bad_setup, capsys, case, match):
    """A truncated or NaN file is broken, not made for another model: no hint about base models."""
    from safetensors.torch import load_file, save_file

    tmp = bad_setup
    src = tmp / "a.safetensors"
    if case == "truncated":
        (tmp / f"{case}.safetensors").write_bytes(src.read_bytes()[:-100])
    else:
        tensors = load_file(str(src))
        key = next(k for k in tensors if k.endswith("lora_up.weight"))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(tmp / f"{case}.safetensors"))
    recipe = _recipe(tmp, f"{case}.yaml", concepts=[{"name": "a", "lora": f"{case}.safetensors", "trigger": "sks"}])
    assert main(["merge", str(recipe), "-o", str(tmp / f"out-{case}"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and "base model" not in err, err


def _planted_leftovers(folder: Path, out_name: str) -> list[Path]:
    """Temporaries as a merge killed with SIGKILL leaves them (named with this host and a finished pid)."""
    import subprocess

    from loraclr.io.safe import owner_tag

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tag = f"{owner_tag().split('.')[0]}.{gone.pid}."
    planted = [folder / f"loraclr-features-{tag}a1", folder / f"loraclr-offsets-{tag}b2",
               folder / f".{out_name}.{tag}c3.tmp"]
    for p in planted:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "x.safetensors").write_bytes(b"spilled")
    return planted


def test_interrupted_merge_exits_130_and_the_next_run_sweeps_and_records_names(tmp_path, tiny_sd1, capsys,
                                                                                monkeypatch, caplog):
    """Ctrl-C: exit 130, one line, nothing left behind. A run after a killed one removes what that left beside
    the output. The merged LoRA names its inputs by file name and sha256, not by path, and every file of the
    output is readable by others (mode 0644 under umask 022)."""
    import hashlib
    import logging
    import os
    import stat

    import loraclr.export
    import loraclr.merging
    from loraclr.io import load_lora

    recipe, _ = _setup(tmp_path, tiny_sd1, "sd1", method="lstsq")
    capsys.readouterr()  # the set-up's own saving bars
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"

    def interrupted(pipe, concepts, table, settings, update, spill_dir):
        assert spill_dir.is_dir() and spill_dir.parent == tmp_path
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loraclr.merging, "collect_spatial", interrupted)
        assert main(["merge", str(recipe), "-o", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == "loraclr merge: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # spill folder gone, no output

    original_export = loraclr.export.export_files

    def interrupted_export(tmp, *args, **kw):
        original_export(tmp, *args, **kw)
        raise KeyboardInterrupt  # everything written into the temporary output, not yet renamed

    with monkeypatch.context() as m:
        m.setattr(loraclr.export, "export_files", interrupted_export)
        assert main(["merge", str(recipe), "-o", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == "loraclr merge: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    planted = _planted_leftovers(tmp_path, out.name)
    umask = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO, logger="loraclr.io.safe"):
            assert main(["merge", str(recipe), "-o", str(out), "--quiet"]) == 0
    finally:
        os.umask(umask)
    assert not any(p.exists() for p in planted)
    assert all(f"removed {p}" in caplog.text for p in planted), caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])

    want = [{"file": f"c{i}.safetensors",
             "sha256": hashlib.sha256((tmp_path / f"c{i}.safetensors").read_bytes()).hexdigest()} for i in range(3)]
    for fmt in ("kohya", "diffusers"):
        meta = load_lora(out / f"merged_lora_{fmt}.safetensors").metadata
        assert json.loads(meta["loraclr.merged_from"]) == want
        assert str(tmp_path) not in json.dumps(meta)
    assert load_lora(out / "merged_lora_kohya.safetensors").metadata["modelspec.merged_from"] == \
        "c0.safetensors, c1.safetensors, c2.safetensors"
    for f in out.rglob("*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
