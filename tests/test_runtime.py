"""loraclr.runtime: the precision and thread choices the commands share, their flags, and --quiet."""

from __future__ import annotations

import argparse
import logging
import warnings

import pytest
import torch

import loraclr.runtime as runtime


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    """Each test starts with no command-line precision and leaves torch's thread count as it found it."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_command_line_precision", None)
    runtime._auto_precision.cache_clear()
    yield
    runtime._auto_precision.cache_clear()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_on_the_cpu_is_bf16_only_where_native(monkeypatch, caplog, native, want):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="loraclr.runtime"):
        assert runtime.choose_precision("auto", "cpu") == want
        assert runtime.choose_precision(None, "cpu") == want  # nothing asked on the command line: auto
    # said once, with the reason
    assert caplog.text.count("precision:") == 1
    assert ("computes bf16 natively" if native else "would be emulated and much slower") in caplog.text


def test_auto_precision_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.choose_precision("auto", "cuda") == torch.bfloat16
    runtime._auto_precision.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.choose_precision("auto", "cuda:0") == torch.float32


def test_explicit_precision_is_taken_as_it_is(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.choose_precision("bf16", "cpu") == torch.bfloat16
    assert runtime.choose_precision("float32", "cpu") == torch.float32  # the recipe's spelling
    with pytest.raises(argparse.ArgumentTypeError, match="choose auto, fp32 or bf16"):
        runtime.choose_precision("fp8", "cpu")


def test_cpu_capability_probe_matches_the_cpu_flags():
    """The probe agrees with what the kernel reports (AVX512-BF16 or AMX present = native bf16)."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert runtime.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & set(flags))


@pytest.mark.parametrize("cores, load, env, want", [
    (8, 0.2, None, 8),  # idle machine: every core
    (8, 5.6, None, 2),  # others keep ~6 cores busy
    (2, 8.0, None, 1),  # overloaded: still one
    (8, 0.0, "3", 3),  # OMP_NUM_THREADS caps it
])
def test_default_threads_are_the_free_cores(monkeypatch, caplog, cores, load, env, want):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    with caplog.at_level(logging.INFO, logger="loraclr.runtime"):
        assert runtime.choose_threads(None) == want
    assert torch.get_num_threads() == want
    assert f"threads: {want} (the free ones of {cores} cores" in caplog.text


def test_explicit_threads(monkeypatch):
    assert runtime.choose_threads(1) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert runtime.choose_threads(0) == 2  # torch's own choice, untouched
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        runtime.choose_threads(-1)


def test_flags_parse_and_apply(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    p = argparse.ArgumentParser()
    runtime.add_runtime_arguments(p)
    args = p.parse_args([])
    assert (args.precision, args.threads) == ("auto", None)
    assert runtime.apply_runtime(p.parse_args(["--threads", "1"])) == {"threads": 1, "precision": torch.float32}
    args = p.parse_args(["--precision", "bfloat16", "--threads", "1"])
    assert args.precision == "bf16"
    assert runtime.apply_runtime(args) == {"threads": 1, "precision": torch.bfloat16}
    # library code given no precision now follows the flag
    assert runtime.choose_precision(None, "cpu") == torch.bfloat16
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp16"])
    # a command whose precision has another source (the merge's recipe) leaves it alone without the flag
    p = argparse.ArgumentParser()
    runtime.add_runtime_arguments(p, precision_default=None, precision_help="the recipe's otherwise")
    assert runtime.apply_runtime(p.parse_args(["--threads", "1"])) == {"threads": 1, "precision": None}


def test_quiet_silences_the_libraries_but_not_loraclr():
    import diffusers
    import transformers

    levels = transformers.utils.logging.get_verbosity(), diffusers.utils.logging.get_verbosity()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runtime.quiet_libraries()
            for module in ("transformers.image_processing_utils", "diffusers.models.modeling_utils",
                           "loraclr.merging"):
                warnings.warn_explicit(f"notice from {module}", UserWarning, "x.py", 1, module=module)
        assert [str(w.message) for w in caught] == ["notice from loraclr.merging"]
        assert transformers.utils.logging.get_verbosity() == logging.ERROR
        assert diffusers.utils.logging.get_verbosity() == logging.ERROR
    finally:
        transformers.utils.logging.set_verbosity(levels[0])
        diffusers.utils.logging.set_verbosity(levels[1])
