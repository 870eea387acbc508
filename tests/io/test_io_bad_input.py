"""One test per bad input: the message names the file, key or layer, and nothing is written."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from loraclr.io import load_lora, save_lora
from loraclr.io.safe import atomic_write, check_output_path
from loraclr.lora import LoraLayer

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _kohya(tmp_path, name="in.safetensors", **parts):
    parts = parts or {"lora_down.weight": torch.randn(4, 768), "lora_up.weight": torch.randn(320, 4)}
    path = tmp_path / name
    save_file({f"{NAME}.{k}": v for k, v in parts.items()}, str(path))
    return path


def _listing(folder):
    return sorted(os.listdir(folder))


def test_pickle_refused_without_opt_in_and_weights_only_with_it(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({f"{NAME}.lora_down.weight": torch.randn(4, 768), f"{NAME}.lora_up.weight": torch.randn(320, 4)}, path)
    with pytest.raises(ValueError, match=r"lora\.pt: is a pickle file.*allow_pickle"):
        load_lora(path)
    assert KEY in load_lora(path, allow_pickle=True).layers

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt: could not be loaded weights-only"):
        load_lora(evil, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_garbage_files(tmp_path):
    good = _kohya(tmp_path)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc\.safetensors: not a readable safetensors file.*truncated"):
        load_lora(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match=r"garbage\.safetensors: neither a safetensors file nor a torch pickle"):
        load_lora(tmp_path / "garbage.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors: the file is empty"):
        load_lora(tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(tmp_path / "missing.safetensors")


def test_nan_and_inf_are_refused_naming_the_key(tmp_path):
    down = torch.randn(4, 768)
    down[1, 2] = float("nan")
    path = _kohya(tmp_path, **{"lora_down.weight": down, "lora_up.weight": torch.randn(320, 4)})
    with pytest.raises(ValueError, match=rf"in\.safetensors: non-finite values in {NAME}\.lora_down\.weight \(1 NaN"):
        load_lora(path)
    # and the writer refuses before writing anything
    up = torch.randn(320, 4)
    up[0, 0] = float("inf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=rf"non-finite values in {NAME}\.lora_up\.weight"):
        save_lora({KEY: LoraLayer(torch.randn(4, 768), up, 4.0)}, out / "x.safetensors", format="kohya", family="sd1")
    assert _listing(out) == []


def test_shape_mismatch_names_the_layer(tmp_path):
    path = _kohya(tmp_path, **{"lora_down.weight": torch.randn(4, 768), "lora_up.weight": torch.randn(320, 8)})
    with pytest.raises(ValueError, match=rf"in\.safetensors: {KEY}: shape mismatch, lora_down \(4, 768\) has rank 4"):
        load_lora(path)
    # real SD1 attn2.to_k is (320, 768): a LoRA claiming (640, 768) there does not fit the model it names
    path = _kohya(tmp_path, "wrong.safetensors",
                  **{"lora_down.weight": torch.randn(4, 768), "lora_up.weight": torch.randn(640, 4)})
    with pytest.raises(ValueError, match=rf"{KEY}: shape mismatch, the LoRA changes a \(640, 768\) weight"):
        load_lora(path)


def test_unknown_keys_are_listed(tmp_path):
    path = tmp_path / "u.safetensors"
    save_file({f"{NAME}.lora_down.weight": torch.randn(4, 768), f"{NAME}.lora_up.weight": torch.randn(320, 4),
               "lora_unet_down_blocks_0_bogus_layer.lora_down.weight": torch.randn(4, 4),
               f"{NAME}.weird_suffix": torch.randn(1)}, str(path))
    with pytest.raises(ValueError, match=r"u\.safetensors: unknown keys") as err:
        load_lora(path)
    assert "lora_unet_down_blocks_0_bogus_layer.lora_down.weight" in str(err.value)
    assert f"{NAME}.weird_suffix" in str(err.value)


def test_wrong_family_names_the_evidence(tmp_path):
    path = _kohya(tmp_path)
    with pytest.raises(ValueError, match=rf"in\.safetensors: the file is not a sdxl LoRA: {KEY} reads 768-wide "
                                         r"text features -> sd1"):
        load_lora(path, family="sdxl")
    assert load_lora(path, family="sd1").family == "sd1"


def test_dora_refused_with_reason(tmp_path):
    path = _kohya(tmp_path, **{"lora_down.weight": torch.randn(4, 768), "lora_up.weight": torch.randn(320, 4),
                               "dora_scale": torch.randn(1, 768)})
    with pytest.raises(ValueError, match=rf"{KEY} is a DoRA layer.*base weight"):
        load_lora(path)


def test_unwritable_or_input_output_paths_write_nothing(tmp_path):
    src = _kohya(tmp_path)
    lora = load_lora(src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="would overwrite or go inside the input"):
        save_lora(lora.layers, src, format="kohya", family="sd1", merged_from=[str(src)])
    assert src.read_bytes() == before
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    real_access = os.access
    try:
        # root ignores mode bits: make the check see what an ordinary user would
        import loraclr.io.safe as safe

        safe.os.access = lambda p, m: False if str(p) == str(ro.resolve()) else real_access(p, m)
        with pytest.raises(PermissionError, match=r"ro is not writable"):
            save_lora(lora.layers, ro / "x.safetensors", format="kohya", family="sd1")
        assert _listing(ro) == []
    finally:
        safe.os.access = real_access
        ro.chmod(0o700)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is not a folder"):
        save_lora(lora.layers, tmp_path / "afile" / "x.safetensors", format="kohya", family="sd1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "no" / "such" / "x.safetensors")


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["out.safetensors"]


def test_atomic_write_gives_files_the_usual_mode(tmp_path):
    """A file written through mkstemp would be 0600: unreadable by the other users a merged LoRA is shared with."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        save_lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                   LoraLayer(torch.randn(2, 4), torch.randn(4, 2), 2.0)}, tmp_path / "b.safetensors",
                  format="diffusers", family="sd1")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_invalid_layer_key_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"unet\.nowhere\.to_q: cannot be named in a sdxl kohya file"):
        save_lora({"unet.nowhere.to_q": LoraLayer(torch.randn(2, 4), torch.randn(4, 2), 2.0)},
                  tmp_path / "x.safetensors", format="kohya", family="sdxl")
    assert _listing(tmp_path) == []


def test_output_folder_holding_an_input_is_refused(tmp_path):
    src = _kohya(tmp_path)
    with pytest.raises(ValueError, match="holds the input"):
        check_output_path(tmp_path, [src])
    assert src.exists()


def test_files_written_into_a_folder_get_the_usual_mode(tmp_path):
    """safetensors' save_file creates files 0600; an atomically written folder (a merged output, learned tokens
    beside a LoRA) must be readable by the others it is shared with, like everything else."""
    import stat

    from loraclr.io import save_embeddings
    from loraclr.lora import LearnedToken

    old = os.umask(0o022)
    try:
        tokens = [LearnedToken(f"<t{i}>", {"text_encoder": torch.randn(1, 8)}) for i in range(2)]
        written = save_embeddings(tokens, tmp_path / "embeddings", "a1111")
        with atomic_write(tmp_path / "merged") as tmp:
            (tmp / "pipeline" / "unet").mkdir(parents=True)
            save_file({"w": torch.zeros(2)}, str(tmp / "pipeline" / "unet" / "model.safetensors"))
    finally:
        os.umask(old)
    files = [*written, tmp_path / "merged" / "pipeline" / "unet" / "model.safetensors"]
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_temporaries_of_a_killed_process_are_swept_by_the_next_write(tmp_path, caplog):
    """What a killed write left beside its output (named with the host and pid) goes at the next write to the
    same place; a live process's temporaries, another host's and unrelated files stay."""
    import logging
    import subprocess
    import sys

    from loraclr.io.safe import owner_tag

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = owner_tag().split(".")[0]
    dead_tmp = tmp_path / f".out.safetensors.{host}.{gone.pid}.abc123.tmp"
    dead_tmp.write_bytes(b"half")
    dead_old = tmp_path / f".out.safetensors.old.{host}.{gone.pid}.xyz"
    dead_old.mkdir()
    (dead_old / "x").write_bytes(b"old")
    kept = [tmp_path / f".out.safetensors.{owner_tag()}live.tmp",  # this process: still writing
            tmp_path / f".out.safetensors.otherhost.{gone.pid}.def.tmp",  # another machine's, on a shared disk
            tmp_path / f".other.safetensors.{host}.{gone.pid}.ghi.tmp",  # another output's
            tmp_path / "notes.txt"]
    for p in kept:
        p.write_bytes(b"keep")
    with caplog.at_level(logging.INFO, logger="loraclr.io.safe"), atomic_write(tmp_path / "out.safetensors") as tmp:
        tmp.write_bytes(b"new")
    assert not dead_tmp.exists() and not dead_old.exists()
    assert all(p.exists() for p in kept)
    assert (tmp_path / "out.safetensors").read_bytes() == b"new"
    assert f"left behind by process {gone.pid} that is gone" in caplog.text and dead_tmp.name in caplog.text
