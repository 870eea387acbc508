"""Device-aware training on the CPU: ``device="cpu"`` is the default path exactly, and ``train_concepts.py
--jobs 2`` trains concepts in child processes into the same files and manifest as the sequential run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loraclr.models import build_pipeline
from loraclr.training import ConceptData, TrainConfig, denoising_loss, train_lora, world_identity_data


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return build_pipeline("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def data(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    d = world_identity_data("rubo", "a rubox creature", n=4, seed=0, n_prior=2)

    def rs(images):
        return np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.BICUBIC)) for i in images])

    return ConceptData(rs(d.images), d.captions, rs(d.prior_images), d.prior_captions, "rubo")


@pytest.mark.parametrize("text_encoder", [True, False])
def test_explicit_cpu_device_is_the_default_path(pipe, data, text_encoder):
    cfg = TrainConfig(steps=2, batch=2, prior_batch=1, seed=5, warmup=1, train_text_encoder=text_encoder)
    a = train_lora(pipe, data, cfg, log_every=0)
    b = train_lora(pipe, data, cfg, log_every=0, device=torch.device("cpu"))
    assert a.losses == b.losses and set(a.layers) == set(b.layers)
    for k, layer in a.layers.items():
        assert b.layers[k].down.device.type == "cpu"
        assert torch.equal(layer.down, b.layers[k].down) and torch.equal(layer.up, b.layers[k].up)
    assert denoising_loss(pipe, data, a.layers, n_draws=1) == denoising_loss(pipe, data, b.layers, n_draws=1)


def test_unknown_device_is_refused(pipe, data):
    with pytest.raises((RuntimeError, ValueError)):
        train_lora(pipe, data, TrainConfig(steps=1, batch=1), log_every=0, device="nodev")


TRAIN_CONCEPTS = ("scripts/train_concepts.py", "train_concepts_script")  # for the `script` fixture


SMALL = ["--steps", "1", "--token-warmup", "1", "--samples", "0", "--n-images", "4", "--prior", "2", "--batch", "2",
         "--prior-batch", "1"]


def test_jobs_need_steps(tmp_path, script):
    with pytest.raises(SystemExit):
        script(*TRAIN_CONCEPTS).main(["--only", "rubo", "--jobs", "2", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "r")])


def test_jobs_train_in_children_like_the_sequential_run(tmp_path, script):
    out_p, out_s = tmp_path / "par", tmp_path / "seq"
    par_script = script(*TRAIN_CONCEPTS)  # a fresh module per run: main() sets its OUT / RUNS
    assert par_script.main(["--only", "tavi", "rubo", "--jobs", "2", *SMALL, "--out", str(out_p),
                            "--runs", str(tmp_path / "runs_p")]) == 0
    assert script(*TRAIN_CONCEPTS).main(["--only", "tavi", "rubo", *SMALL, "--out", str(out_s), "--runs", str(tmp_path / "runs_s")]) == 0
    par, seq = (json.loads((d / "manifest.json").read_text()) for d in (out_p, out_s))
    assert [e["name"] for e in par["concepts"]] == ["rubo", "tavi"]  # plan order, whatever finished first
    for doc in (par, seq):
        for e in doc["concepts"]:
            e.pop("seconds")
    assert par == seq
    # kohya identities learn tokens: their embedding folders travel with the LoRA out of the child's folder
    assert sorted(p.name for p in out_p.iterdir()) == ["manifest.json", "rubo.embeddings", "rubo.safetensors",
                                                        "tavi.embeddings", "tavi.safetensors"]
    assert [e["steps"] for e in par["concepts"]] == [4, 1]  # rubo trains STEP_FACTOR (4) x the steps
    # recorded (the children got --token-warmup), WARMUP_FACTOR x it for the identities that have one
    assert [e["token_warmup"] for e in par["concepts"]] == [par_script.WARMUP_FACTOR.get(n, 1) for n in ("rubo", "tavi")]
    assert [e["tokens"] for e in par["concepts"]] == [["<rubo1>", "<rubo2>", "<rubo3>"], ["<tavi1>", "<tavi2>", "<tavi3>"]]
    from safetensors.torch import load_file

    def same(rel: str) -> bool:
        a, b = load_file(out_p / rel), load_file(out_s / rel)
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for name in ("rubo", "tavi"):
        assert same(f"{name}.safetensors")
        embs = sorted(p.name for p in (out_s / f"{name}.embeddings").iterdir())
        assert embs and embs == sorted(p.name for p in (out_p / f"{name}.embeddings").iterdir())
        assert all(same(f"{name}.embeddings/{f}") for f in embs)
        assert (tmp_path / "runs_p" / "jobs" / f"{name}.log").is_file()


@pytest.mark.slow
def test_a_failed_job_is_reported_and_keeps_the_others(tmp_path, caplog, script):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rubo.safetensors").write_bytes(b"trained earlier")  # exists: skipped, kept in the manifest
    rc = script(*TRAIN_CONCEPTS).main(["--only", "rubo", "tavi", "--jobs", "2", *SMALL, "--device", "nodev", "--out", str(out),
                         "--runs", str(tmp_path / "runs")])
    assert rc == 1
    log = tmp_path / "runs" / "jobs" / "tavi.log"
    assert log.is_file() and str(log) in caplog.text
    doc = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in doc["concepts"]] == ["rubo"]
    assert (out / "rubo.safetensors").read_bytes() == b"trained earlier" and not (out / "tavi.safetensors").exists()


def test_rank_override_trains_and_records_that_rank(tmp_path, script):
    out = tmp_path / "out"
    mod = script(*TRAIN_CONCEPTS)
    assert mod.main(["--only", "tavi", "--rank", "2", *SMALL, "--out", str(out), "--runs", str(tmp_path / "r")]) == 0
    (entry,) = json.loads((out / "manifest.json").read_text())["concepts"]
    plan_rank, plan_alpha = next(row[3:] for row in mod.PLAN if row[0] == "tavi")
    assert (entry["rank"], entry["alpha"]) == (2, plan_alpha * 2 / plan_rank)  # the alpha / rank scale kept
    from safetensors.torch import load_file

    sd = load_file(out / "tavi.safetensors")
    downs = [v for k, v in sd.items() if k.endswith("lora_down.weight")]
    assert downs and all(v.shape[0] == 2 for v in downs)
    assert all(float(v) == entry["alpha"] for k, v in sd.items() if k.endswith(".alpha"))
    with pytest.raises(SystemExit):
        script(*TRAIN_CONCEPTS).main(["--only", "tavi", "--rank", "0", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "r")])


def test_promote_installs_a_snapshot_as_the_plan_would_train_it(tmp_path, script):
    """A snapshot after K LoRA steps, promoted, is the file (tensors, metadata, learned tokens) and the manifest entry
    that a run of K steps writes; a file trained otherwise than the plan says, or a promote onto a file, is refused."""
    from safetensors import safe_open

    def run(out, *extra):
        return script(*TRAIN_CONCEPTS).main(["--only", "tavi", *SMALL, "--out", str(tmp_path / out),
                                             "--runs", str(tmp_path / "r"), *extra])

    assert run("long", "--steps", "2", "--snapshots", "1") == 0
    assert run("direct") == 0  # SMALL: --steps 1
    snap = tmp_path / "long" / "tavi-s1.safetensors"
    assert run("prom", "--promote", str(snap)) == 0
    assert snap.is_file() and (tmp_path / "long" / "tavi-s1.embeddings").is_dir()  # the source is left as it was

    def read(out):
        with safe_open(tmp_path / out / "tavi.safetensors", "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    (m_d, t_d), (m_p, t_p) = read("direct"), read("prom")
    assert m_p == m_d and m_p["loraclr.embeddings"] == "tavi.embeddings" and m_p["modelspec.title"] == "tavi"
    assert t_p.keys() == t_d.keys() and all(torch.equal(t_p[k], t_d[k]) for k in t_d)
    embs = sorted(p.name for p in (tmp_path / "direct" / "tavi.embeddings").iterdir())
    assert embs == sorted(p.name for p in (tmp_path / "prom" / "tavi.embeddings").iterdir())
    for f in embs:
        with safe_open(tmp_path / "direct" / "tavi.embeddings" / f, "pt") as a, \
                safe_open(tmp_path / "prom" / "tavi.embeddings" / f, "pt") as b:
            assert a.metadata() == b.metadata() and a.keys() == b.keys()
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    (e_d,), (e_p,) = (json.loads((tmp_path / d / "manifest.json").read_text())["concepts"] for d in ("direct", "prom"))
    for k in ("loss_first", "loss_last", "seconds"):
        e_d.pop(k)
    assert e_p == e_d

    assert run("prom", "--promote", str(snap)) == 2  # tavi.safetensors exists there now
    assert run("other", "--promote", str(snap), "--steps", "2") == 2  # the plan would train 2 LoRA steps
    assert not (tmp_path / "other" / "tavi.safetensors").exists()
    assert run("seed", "--promote", str(snap), "--seed", "1") == 2
