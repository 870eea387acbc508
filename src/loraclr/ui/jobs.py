"""Long work off the page's request threads: one job at a time, with progress, a cancel flag and one-line errors.

A job runs a function in a thread. Commands that write outputs (``merge``, ``evaluate``) run as the real
command line in a child process (:func:`run_command`): their numbers and error lines are the CLI's by
construction, their progress is read from the command's own progress bars, and cancel is the CLI's Ctrl-C
(SIGINT), whose cleanup leaves nothing half-written. Generation runs in the page's process (the model stays
loaded between clicks) and checks the flag before every UNet call (:mod:`loraclr.ui.tasks`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraclr.cli import USER_ERRORS, error_line

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
# a child that ignores SIGINT this long after cancel is killed; what it left is swept by the next write
CANCEL_GRACE_S = 20.0
# a tqdm line: "features (spatial):  50%|#####     | 1/2 [00:01<00:01, ...]"
_BAR = re.compile(r"^(?P<desc>[^|]*?):\s+(?P<pct>\d+)%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)")
_MAX_NOTES = 20
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # a nested bar's cursor moves


class Cancelled(Exception):
    """Raised inside a job's work when the user pressed cancel."""


@dataclass
class Job:
    """What the page shows about one piece of work. ``command`` names the CLI command it stands for
    (``merge``, ``generate``, ...): its errors are worded as that command's."""

    command: str
    phase: str = "starting"
    fraction: float | None = None
    state: str = RUNNING
    message: str = ""  # the one line shown when it failed or was cancelled
    notes: list[str] = field(default_factory=list)  # warnings the work printed
    result: Any = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def cancel(self) -> None:
        self._cancel.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancel was pressed (work calls this between its steps)."""
        if self._cancel.is_set():
            raise Cancelled

    def report(self, phase: str, fraction: float | None = None) -> None:
        self.phase = phase
        self.fraction = None if fraction is None else min(max(fraction, 0.0), 1.0)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes = (self.notes + [text])[-_MAX_NOTES:]

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    def status_line(self) -> str:
        if self.state == RUNNING:
            pct = f" {self.fraction:.0%}" if self.fraction is not None else ""
            stop = " (cancelling...)" if self.cancel_requested else ""
            return f"{self.command}: {self.phase}{pct}, {self.seconds:.0f} s{stop}"
        if self.state == DONE:
            return f"{self.command}: done in {self.seconds:.1f} s"
        return self.message


class JobRunner:
    """Runs one job at a time: the machine's cores go to it, and a second click cannot start a second merge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: Job | None = None

    def start(self, command: str, work: Callable[[Job], Any]) -> Job:
        """Start ``work(job)`` in a thread; raise ValueError if another job is still running."""
        with self._lock:
            if self.current is not None and not self.current.done:
                raise ValueError(f"{self.current.command} is still running; wait for it or cancel it")
            job = Job(command)
            job._thread = threading.Thread(target=_run, args=(job, work), name=f"loraclr-{command}", daemon=True)
            self.current = job
            job._thread.start()
        return job

    def cancel(self) -> Job | None:
        job = self.current
        if job is not None and not job.done:
            job.cancel()
        return job


def _run(job: Job, work: Callable[[Job], Any]) -> None:
    try:
        job.result = work(job)
        job.state = DONE
    except (Cancelled, KeyboardInterrupt):
        job.state, job.message = CANCELLED, f"loraclr {job.command}: cancelled; nothing was written"
    except CommandFailed as e:
        job.state, job.message = FAILED, str(e)
    except Exception as e:
        job.state, job.message = FAILED, error_message(job.command, e)
    finally:
        job.finished = time.monotonic()


def error_message(command: str, e: BaseException) -> str:
    """The CLI's line for a user error (``loraclr COMMAND: error: ...``). A bug, not the user's input, gets one
    line too, and its traceback goes to the console."""
    if isinstance(e, USER_ERRORS):
        return error_line(command, e)
    log.exception("%s failed", command)
    return f"loraclr {command}: unexpected error: {type(e).__name__}: {e} (details in the console)"


class CommandFailed(Exception):
    """A child command exited with an error; the message is its own error line."""


def run_command(job: Job, argv: list[str], *, env: dict[str, str] | None = None) -> str:
    """Run ``loraclr ARGV`` in a child process, following its progress bars into ``job``; returns its stdout.

    Cancel sends SIGINT (the CLI's Ctrl-C: outputs are written atomically, so the interrupted command leaves
    nothing behind) and raises :class:`Cancelled` once the child has exited. An error raises
    :class:`CommandFailed` with the command's own error line.
    """
    cmd = [sys.executable, "-m", "loraclr", *argv]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=child_env)
    out_chunks: list[bytes] = []
    err_lines: list[str] = []
    prefix = f"loraclr {argv[0]}: "

    def read_stdout() -> None:
        for chunk in iter(lambda: proc.stdout.read(65536), b""):
            out_chunks.append(chunk)

    def read_stderr() -> None:
        buf = b""
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for raw in lines:
                _stderr_line(job, raw.decode("utf-8", "replace").strip(), prefix, err_lines)
        _stderr_line(job, buf.decode("utf-8", "replace").strip(), prefix, err_lines)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for t in readers:
        t.start()
    interrupted_at = None
    while proc.poll() is None:
        if job.cancel_requested and interrupted_at is None:
            job.report("cancelling")
            proc.send_signal(signal.SIGINT)
            interrupted_at = time.monotonic()
        elif interrupted_at is not None and time.monotonic() - interrupted_at > CANCEL_GRACE_S:
            proc.kill()
        time.sleep(0.1)
    for t in readers:
        t.join(5)
    if interrupted_at is not None and proc.returncode != 0:
        raise Cancelled  # a command that finished before the Ctrl-C reached it exits 0: its output is whole
    if proc.returncode != 0:
        errors = [line for line in err_lines if line.startswith(prefix)]
        if errors:
            raise CommandFailed(errors[-1])
        last = err_lines[-1] if err_lines else "no message"
        raise CommandFailed(f"loraclr {argv[0]}: unexpected error (exit code {proc.returncode}): {last}")
    return b"".join(out_chunks).decode("utf-8", "replace")


def _stderr_line(job: Job, line: str, prefix: str, err_lines: list[str]) -> None:
    line = _ESCAPES.sub("", line).strip()
    if not line:
        return
    m = _BAR.match(line)
    if m:
        total = int(m["total"])
        job.report(m["desc"].strip(), int(m["n"]) / total if total else None)
        return
    err_lines.append(line)
    if line.startswith("WARNING "):
        job.note(line.removeprefix("WARNING "))
