"""`loraclr ui`: the extra it needs, where it listens, which files it serves, pickles."""

from __future__ import annotations

import pytest

from loraclr.ui import tasks
from loraclr.ui.folders import WORLD_ASSETS, Folders


def test_without_gradio_one_line_names_the_extra(monkeypatch, cli):
    import loraclr.commands.ui as command

    real = command.importlib.util.find_spec
    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: None if name == "gradio" else real(name))
    code, err = cli(["ui", "--no-browser"])
    assert code == 2
    assert err.strip() == 'loraclr ui: error: the web page needs gradio: pip install -e ".[ui]"'


@pytest.fixture
def launched(monkeypatch):
    """What `loraclr ui` hands to gradio's launch, without serving."""
    gr = pytest.importorskip("gradio")
    seen = {}

    def fake_launch(self, **kw):
        seen.update(kw)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(tasks, "preload", lambda: None)
    return seen


def test_localhost_by_default_and_only_the_named_folders_served(launched, tmp_path, cli):
    code, err = cli(["ui", "--no-browser", "--folder", str(tmp_path / "a"), "--folder", str(tmp_path / "b"),
                         "--max-upload-mb", "5"])
    assert code == 0 and "WARNING" not in err
    assert launched["server_name"] == "127.0.0.1" and launched["inbrowser"] is False
    assert launched["allowed_paths"] == [str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())]
    assert launched["max_file_size"] == "5mb" and launched["show_error"] is False


def test_another_host_is_announced_loudly(launched, tmp_path, cli):
    code, err = cli(["ui", "--no-browser", "--host", "0.0.0.0", "--folder", str(tmp_path)])
    assert code == 0 and launched["server_name"] == "0.0.0.0"
    assert "ANYONE who can reach this address can use the page" in err


def test_pickles_refused_unless_allowed(tmp_path, cli):
    pth = WORLD_ASSETS / "concepts" / "ruzi.pth"
    plain = tasks.Settings(Folders.create([tmp_path / "w1"]))
    row, error = tasks.concept_row(plain, pth)
    code, err = cli(["inspect", str(pth)])
    assert code == 2 and error == err.strip()
    assert "--allow-pickle" in error
    allowed = tasks.Settings(Folders.create([tmp_path / "w2"]), allow_pickle=True)
    row, error = tasks.concept_row(allowed, pth)
    assert error is None and row[4] != "?"
    assert "--allow-pickle" in tasks.plan_merge(allowed, {}, "m").argv


def test_uploads_must_be_lora_files(tmp_path):
    settings = tasks.Settings(Folders.create([tmp_path / "w"]))
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="not a LoRA file"):
        tasks.store_upload(settings, bad)
    good = tmp_path / "mine.safetensors"
    good.write_bytes((WORLD_ASSETS / "concepts" / "rubo.safetensors").read_bytes())
    stored = tasks.store_upload(settings, good)
    assert stored.parent == settings.folders.work / "uploads" and stored.read_bytes() == good.read_bytes()
