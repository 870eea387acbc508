"""Fixtures of the web page's tests: a work folder and one merge of two shipped concepts, made by the page's
own merge task (the merge command in a child process), shared by the session."""

from __future__ import annotations

import contextlib
import io

import pytest

from loraclr.cli import main
from loraclr.ui import tasks
from loraclr.ui.folders import WORLD_ASSETS, Folders
from loraclr.ui.jobs import DONE, JobRunner

CONCEPTS = WORLD_ASSETS / "concepts"


def _concept_rows(settings, names=tasks.DEFAULT_CONCEPTS):
    rows = []
    for n in names:
        row, err = tasks.concept_row(settings, CONCEPTS / f"{n}.safetensors")
        assert err is None, err
        rows.append(row)
    return rows


def _run_job(command, work, timeout=300):
    job = JobRunner().start(command, work)
    assert job.wait(timeout), f"{command} did not finish in {timeout} s"
    return job


@pytest.fixture(scope="session")
def settings(tmp_path_factory):
    return tasks.Settings(Folders.create([tmp_path_factory.mktemp("ui-work")]), threads=1)


@pytest.fixture(scope="session")
def merged(settings):
    """(MergeView, the merge command's printed summary) of rubo + rika merged with the defaults."""
    recipe = tasks.recipe_dict(settings, _concept_rows(settings), "loraclr", tasks.settings_rows("loraclr"))
    plan = tasks.plan_merge(settings, recipe, "rubo-rika")
    job = _run_job("merge", lambda job: tasks.run_merge(job, plan))
    assert job.state == DONE, job.message
    return job.result


@pytest.fixture
def concept_rows():
    """Concept-table rows of shipped concepts, as the Merge tab fills them."""
    return _concept_rows


@pytest.fixture
def run_job():
    """Run work as a page job and wait for it."""
    return _run_job


@pytest.fixture
def cli():
    """``cli(argv) -> (exit code, stderr)`` of ``loraclr ARGV`` run in this process."""

    def run(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
        return code, err.getvalue()

    return run
