"""How a command runs on this machine: compute precision (bf16 autocast or fp32) and torch CPU threads.

Commands call :func:`add_runtime_arguments` on their parser and :func:`apply_runtime` on the parsed
arguments; library code that was given no precision asks :func:`choose_precision` with ``None``.

Why a choice at all: bf16 autocast is only fast where the hardware computes in bf16 (CUDA devices that support
it, CPUs with AVX512-BF16 or AMX). On other CPUs (AVX2 only) torch emulates it, which makes training many
times slower than fp32. Threads: on a shared machine more torch threads than free cores only adds contention.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import warnings

import torch

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the recipe's and torch's spellings of the same precisions
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}
PRECISION_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}  # dtype -> recipe features.precision

# What the command line asked for (:func:`apply_runtime`), so that library code given no precision (the demo's
# quick LoRAs, a TrainConfig without ``autocast``) follows the flag, as it follows torch.set_num_threads.
_command_line_precision: str | None = None


def precision_name(text: str) -> str:
    """``--precision`` value: auto, fp32 or bf16 (float32 / bfloat16 accepted)."""
    name = PRECISION_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name != "auto" and name not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision {text!r}; choose auto, fp32 or bf16")
    return name


def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute in bf16 (AVX512-BF16 or AMX); torch emulates bf16 elsewhere."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    # older torch without the probes: the dispatch level names bf16 only where it is native
    return any(x in torch.backends.cpu.get_cpu_capability().upper() for x in ("BF16", "AMX"))


@functools.cache
def _auto_precision(device_type: str, index: int | None) -> torch.dtype:
    """The auto choice for one device, logged once per process (capabilities do not change while it runs)."""
    if device_type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        why = "the CUDA device supports bf16" if native else "the CUDA device has no bf16 support"
    elif device_type == "cpu":
        native = cpu_has_native_bf16()
        why = (f"this CPU computes bf16 natively ({torch.backends.cpu.get_cpu_capability()})" if native else
               f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AVX512-BF16 or AMX: bf16 would be "
               "emulated and much slower")
    else:
        native, why = False, f"bf16 speed on {device_type} is unknown"
    dtype = torch.bfloat16 if native else torch.float32
    log.info("precision: %s (auto: %s; --precision to choose)", "bf16" if native else "fp32", why)
    return dtype


def choose_precision(requested: str | None, device: str | torch.device = "cpu") -> torch.dtype:
    """torch.bfloat16 (autocast) or torch.float32 for work on ``device``.

    ``requested``: "auto" picks bf16 only where the device computes it natively (CUDA with bf16 support, a CPU
    with AVX512-BF16 or AMX), else fp32; "fp32" / "bf16" are taken as they are; None means what the command line
    asked for (:func:`apply_runtime`), else auto.
    """
    name = precision_name(requested) if requested is not None else (_command_line_precision or "auto")
    dev = torch.device(device)
    if name == "auto":
        return _auto_precision(dev.type, dev.index)
    return PRECISIONS[name]


def _cores_and_load() -> tuple[int, float]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: take the machine as idle
        load = 0.0
    return cores, load


def _env_threads() -> int | None:
    """OMP_NUM_THREADS when it is set to a positive number: whoever set it chose a ceiling for this process."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


def free_cores() -> int:
    """Cores this process may use minus the machine's 1-minute load average, at least 1 and at most
    OMP_NUM_THREADS when that is set. Read before any work starts, the load is that of the other processes."""
    cores, load = _cores_and_load()
    free = max(1, min(cores, round(cores - load)))
    ceiling = _env_threads()
    return min(free, ceiling) if ceiling else free


def choose_threads(requested: int | None) -> int:
    """Set torch's CPU threads and return how many: ``requested`` (> 0), torch's own default (0), or the
    free cores (None, :func:`free_cores`)."""
    if requested is not None and requested < 0:
        raise ValueError(f"--threads must be >= 0, got {requested}")
    if requested == 0:
        n = torch.get_num_threads()
        log.info("threads: %d (torch's default)", n)
        return n
    if requested is None:
        n = free_cores()
        cores, load = _cores_and_load()
        log.info("threads: %d (the free ones of %d cores at a 1-minute load of %.1f%s; --threads to choose)", n,
                 cores, load, f", OMP_NUM_THREADS={_env_threads()}" if _env_threads() else "")
    else:
        n = requested
        log.info("threads: %d", n)
    torch.set_num_threads(n)
    return n


def add_runtime_arguments(parser: argparse.ArgumentParser, *, precision_default: str | None = "auto",
                          precision_help: str = "") -> None:
    """``--precision {auto,fp32,bf16}`` and ``--threads N``. ``precision_default=None`` leaves the choice to
    something else (a recipe) unless the flag is given; ``precision_help`` adds what it applies to."""
    parser.add_argument(
        "--precision", type=precision_name, choices=("auto", *PRECISIONS), default=precision_default,
        help="compute precision: bf16 autocast or fp32; auto: bf16 where the device computes it natively (CUDA "
             "with bf16, CPUs with AVX512-BF16 or AMX), else fp32" + (f"; {precision_help}" if precision_help
                                                                     else " (default: auto)"))
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: the free cores, i.e. cores minus the machine's load, at "
                             "most OMP_NUM_THREADS; 0 = torch's default)")


def apply_runtime(args: argparse.Namespace) -> dict:
    """Apply ``--threads`` and ``--precision`` (on ``args.device`` where the command has one, else the CPU).

    Returns ``{"threads": int, "precision": torch.dtype | None}`` (None: no --precision given and no default).
    """
    global _command_line_precision
    threads = choose_threads(getattr(args, "threads", None))
    requested = getattr(args, "precision", None)
    _command_line_precision = requested
    precision = None
    if requested is not None:
        device = torch.device(getattr(args, "device", None) or "cpu")
        precision = choose_precision(requested, device)
        if requested != "auto":
            slow = precision == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16()
            (log.warning if slow else log.info)(
                "precision: %s (--precision)%s", requested,
                "; this CPU has no AVX512-BF16 or AMX, so bf16 is emulated and much slower than fp32" if slow else "")
    return {"threads": threads, "precision": precision}


# the libraries whose own logging and warnings --quiet silences (loraclr's warnings still show)
QUIET_LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "torchvision")


def quiet_libraries(notices: bool = True) -> None:
    """No progress bars from the model libraries' loading and saving; with ``notices`` (--quiet) also none of
    their log notices or Python warnings (embedding resizes, image-processor fallbacks, deprecations), so a
    quiet run prints its result and loraclr's own warnings only."""
    # imported here, not at the top: loading them takes seconds, and --help or a bad flag should not wait
    import diffusers
    import huggingface_hub
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    if not notices:
        return
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    for name in QUIET_LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
