"""The page touches files only inside the folders the user named (and reads the built-in world)."""

from __future__ import annotations

import os

import pytest

from loraclr.ui.folders import MERGES, WORLD_ASSETS, Folders, display


@pytest.fixture
def folders(tmp_path):
    return Folders.create([tmp_path / "work", tmp_path / "loras"])


def test_paths_inside_the_named_folders(folders, tmp_path, monkeypatch):
    assert folders.resolve(tmp_path / "loras" / "a.safetensors") == (tmp_path / "loras" / "a.safetensors").resolve()
    assert (tmp_path / "work" / MERGES).is_dir()
    # relative paths, as the page writes them into commands, are taken from the current folder
    monkeypatch.chdir(tmp_path)
    assert display(tmp_path / "work" / "merges" / "x") == "work/merges/x"
    assert folders.resolve("work/merges/x") == (tmp_path / "work" / "merges" / "x").resolve()
    assert display("/etc") == "/etc"


@pytest.mark.parametrize("path", ["../outside.safetensors", "/etc/passwd", "merges/../../../etc"])
def test_paths_outside_are_refused(folders, path):
    with pytest.raises(PermissionError, match="outside the folders this page may read.*--folder DIR"):
        folders.resolve(path)


def test_a_link_out_of_a_folder_is_refused(folders, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    os.symlink(secret, tmp_path / "loras" / "link")
    with pytest.raises(PermissionError):
        folders.resolve(tmp_path / "loras" / "link" / "key")


def test_world_is_readable_not_writable(folders):
    lora = WORLD_ASSETS / "concepts" / "rubo.safetensors"
    assert folders.resolve(lora) == lora.resolve()
    with pytest.raises(PermissionError, match="may write"):
        folders.resolve(lora, write=True)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 101])
def test_output_names_are_plain(folders, name):
    with pytest.raises(ValueError, match="not a plain name"):
        folders.output(MERGES, name)


def test_listing_shows_loras_not_embeddings(folders):
    names = [p.name for p in folders.list_loras(WORLD_ASSETS / "concepts")]
    assert "rubo.safetensors" in names and "ruzi.pth" in names
    assert not any(n.endswith((".embeddings", ".learned_embeds.safetensors")) for n in names)
    with pytest.raises(PermissionError):
        folders.list_loras("/")
