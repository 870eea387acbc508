"""Background jobs: progress, cancel and one-line errors."""

from __future__ import annotations

import threading

import pytest

from loraclr.ui.jobs import CANCELLED, DONE, FAILED, Job, JobRunner, _stderr_line


def test_cancel_stops_work_between_steps():
    started = threading.Event()
    steps = []

    def work(job):
        started.set()
        for i in range(10_000):
            job.check()
            steps.append(i)
            job.report("counting", i / 10_000)
            threading.Event().wait(0.001)
        return "finished"

    runner = JobRunner()
    job = runner.start("generate", work)
    started.wait(5)
    runner.cancel()
    assert job.wait(10)
    assert job.state == CANCELLED and job.result is None and len(steps) < 10_000
    assert job.status_line() == "loraclr generate: cancelled; nothing was written"


def test_one_job_at_a_time():
    gate = threading.Event()
    runner = JobRunner()
    job = runner.start("merge", lambda job: gate.wait(10))
    with pytest.raises(ValueError, match="merge is still running; wait for it or cancel it"):
        runner.start("generate", lambda job: None)
    gate.set()
    assert job.wait(10) and job.state == DONE
    assert runner.start("generate", lambda job: 1).wait(10)


def test_errors_are_one_line_in_the_cli_wording():
    def user_error(job):
        raise FileNotFoundError("x.safetensors: LoRA file not found")

    job = JobRunner().start("generate", user_error)
    job.wait(10)
    assert job.state == FAILED and job.message == "loraclr generate: error: x.safetensors: LoRA file not found"

    def key_error(job):
        raise KeyError("unknown concept 'bob'")

    job = JobRunner().start("merge", key_error)
    job.wait(10)
    assert job.message == "loraclr merge: error: unknown concept 'bob'"  # without the KeyError's quotes

    def bug(job):
        return 1 / 0

    job = JobRunner().start("merge", bug)
    job.wait(10)
    assert job.state == FAILED and "\n" not in job.message and "Traceback" not in job.message
    assert job.message.startswith("loraclr merge: unexpected error: ZeroDivisionError")


def test_progress_bars_of_the_command_become_phases():
    job, errors = Job("merge"), []
    _stderr_line(job, "features (spatial):  50%|█████     | 1/2 [00:00<00:00, 8.09concept/s]", "loraclr merge: ",
                 errors)
    assert job.phase == "features (spatial)" and job.fraction == 0.5 and errors == []
    _stderr_line(job, "Loading weights:   0%|          | 0/68 [00:00<?, ?it/s]\x1b[A", "loraclr merge: ", errors)
    assert job.phase == "Loading weights" and job.fraction == 0.0
    _stderr_line(job, "WARNING loraclr.merging: learned tokens ['<a>'] are not in the trigger", "", errors)
    assert job.notes == ["loraclr.merging: learned tokens ['<a>'] are not in the trigger"]
