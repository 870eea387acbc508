"""``loraclr demo`` on a tiny world: quick LoRAs when none are shipped, shipped LoRAs when they exist, the grid's
size, the table's rows and values, and the refusals (no base model, a non-empty output folder)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from loraclr import demo
from loraclr.cli import main
from loraclr.demo import DemoConfig, QuickLoras, run_demo
from loraclr.evaluate import Evaluators
from loraclr.evaluate.base import to_tensor
from loraclr.evaluate.regions import crop_resize

# A demo small enough for a test: 3 quick LoRAs of 2 steps, 1 prompt x 1 seed, one pair and one triple.
TINY = dict(quick=QuickLoras(steps=2, n_images=4, batch=2), n_prompts=1, seeds=1, n_pairs=1, n_triples=1,
            steps=2, feature_steps=1)


class _ColourClip:
    """A stand-in CLIP with non-negative embeddings (cosines in [0, 1]): colour means of a 2x2 grid for images,
    hashed words for texts. Only the demo's plumbing is under test here, not the evaluators."""

    name = "stub-clip"

    def embed_images(self, images):
        x = to_tensor(images)
        h, w = x.shape[2] // 2, x.shape[3] // 2
        parts = [x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w].mean((2, 3)) for i in (0, 1) for j in (0, 1)]
        e = torch.cat(parts + [torch.full((len(x), 4), 0.1)], 1)  # (B, 16)
        return e / e.norm(dim=1, keepdim=True)

    def embed_texts(self, texts):
        out = torch.full((len(texts), 16), 0.05)
        for i, t in enumerate(texts):
            for word in t.split():
                out[i, zlib.crc32(word.encode()) % 16] += 1.0
        return out / out.norm(dim=1, keepdim=True)


class _ColourIdentity:
    name = "stub-identity"
    threshold = 0.5

    def embed_regions(self, images, boxes):
        crops = crop_resize(to_tensor(images), torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), 16)
        e = torch.cat([crops.mean((2, 3)), crops.std((2, 3)), torch.full((len(crops), 2), 0.1)], 1)
        return e / e.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from loraclr.world.model import build_text_and_unet, build_vae, save_pipeline_folder

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("world") / "tiny-sd"
    te, unet = build_text_and_unet("tiny", seed=0)
    save_pipeline_folder(build_vae("tiny", seed=0), te, unet, folder, state={"step": 3, "total_steps": 10})
    return folder


@pytest.fixture(scope="module")
def evaluators() -> Evaluators:
    return Evaluators(_ColourClip(), _ColourIdentity())


@pytest.fixture(scope="module")
def first_run(tiny_base, evaluators, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    cfg = DemoConfig(base=str(tiny_base), manifest=str(tiny_base.parent / "no-manifest.json"), **TINY)
    return run_demo(cfg, out, progress=False, evaluators=evaluators)


def _check_values(rows: list[dict], methods: list[str]) -> None:
    assert [r["key"] for r in rows] == ["single", "naive", *methods]
    for r in rows:
        suites = ["single"] if r["key"] == "single" else ["single", "multi"]
        assert (r["multi"] is None) == (r["key"] == "single")
        for suite in suites:
            for metric, v in r[suite].items():
                assert v is not None and 0.0 <= v <= 1.0, (r["key"], suite, metric, v)


def test_quick_loras_grid_and_table(first_run, tiny_base):
    res = first_run
    assert res.quick and res.concepts == list(demo.DEFAULT_CONCEPTS)
    # rows: one single prompt per concept, one pair, one triple; columns: single LoRA, naive stack, LoRACLR
    assert res.grid_shape == (3 + 1 + 1, 3)
    with Image.open(res.grid) as im:
        assert im.size == (demo.LABEL_WIDTH + 3 * demo.CELL, demo.HEADER_HEIGHT + 5 * demo.CELL + demo.FOOTER_HEIGHT)
        # the merged column's first cell is a generated image, not the blank canvas
        x0, y0 = demo.LABEL_WIDTH + 2 * demo.CELL, demo.HEADER_HEIGHT
        cell = torch.tensor(list(im.crop((x0, y0, x0 + demo.CELL, y0 + demo.CELL)).getdata()), dtype=torch.float)
        assert float(cell.std()) > 1.0
    payload = json.loads(res.table_json.read_text())
    _check_values(payload["rows"], ["loraclr"])
    assert payload["quick_loras"] is True and payload["base_training_state"]["step"] == 3
    md = res.table_md.read_text()
    for text in ("single LoRA (reference)", "naive stack", "LoRACLR merge", "QUICK LoRAs", "step 3 of 10"):
        assert text in md, text
    cache = res.out_dir / "cache" / "quick-loras"
    assert sorted(p.name for p in cache.glob("*.safetensors")) == sorted(f"{n}.safetensors" for n in res.concepts)
    assert (res.out_dir / "merged-loraclr" / "loraclr.json").is_file()
    assert not list(res.out_dir.parent.glob(".out*"))  # no temporary folder left beside the output


def test_shipped_loras_are_used_and_inputs_kept(first_run, tiny_base, evaluators, tmp_path):
    manifest = first_run.out_dir / "cache" / "quick-loras" / "manifest.json"
    before = {p.name: p.read_bytes() for p in manifest.parent.iterdir()}
    cfg = DemoConfig(base=str(tiny_base), manifest=str(manifest), concepts=("rubo", "rono"), methods=("sum",),
                     **TINY)
    res = run_demo(cfg, tmp_path / "out2", progress=False, evaluators=evaluators)
    assert not res.quick and res.concepts == ["rubo", "rono"]
    assert res.grid_shape == (2 + 1, 3)  # a pair, no triple with two concepts
    with Image.open(res.grid) as im:
        assert im.size == demo.grid_size(3, 3)
    _check_values(json.loads(res.table_json.read_text())["rows"], ["sum"])
    assert "shipped concept LoRAs" in res.table_md.read_text()
    assert {p.name: p.read_bytes() for p in manifest.parent.iterdir()} == before


def test_refuses_non_empty_out_and_missing_base(first_run, tiny_base, tmp_path, capsys, monkeypatch):
    stamp = first_run.grid.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(DemoConfig(base=str(tiny_base), **TINY), first_run.out_dir, progress=False)
    assert first_run.grid.stat().st_mtime_ns == stamp
    assert main(["-q", "demo", "--base", str(tiny_base), "--out", str(first_run.out_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # the built-in base model missing: base_model_path()'s own message
    import loraclr.world.model as world_model

    monkeypatch.setattr(world_model, "BASE_MODEL_DIR", tmp_path / "not-built")
    with pytest.raises(FileNotFoundError, match="not built yet"):
        run_demo(DemoConfig(**TINY), tmp_path / "out3", progress=False)
    assert not (tmp_path / "out3").exists()


@pytest.mark.slow  # two more demo runs: ~30 s on a busy machine
def test_overwrite_reuses_matching_quick_loras(tiny_base, evaluators, tmp_path, caplog):
    cfg = DemoConfig(base=str(tiny_base), manifest=str(tmp_path / "none.json"), concepts=("rubo", "rika"),
                     methods=("sum",), **dict(TINY, n_triples=0))
    out = tmp_path / "out"
    run_demo(cfg, out, progress=False, evaluators=evaluators)
    lora = (out / "cache" / "quick-loras" / "rubo.safetensors").read_bytes()
    with caplog.at_level("INFO", logger="loraclr.demo"):
        run_demo(cfg, out, progress=False, evaluators=evaluators, overwrite=True)
    assert "reusing the quick LoRAs" in caplog.text
    assert (out / "cache" / "quick-loras" / "rubo.safetensors").read_bytes() == lora
