"""The page's work equals the CLI's: same merge numbers, same images, same error lines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loraclr.ui import tasks
from loraclr.ui.folders import display
from loraclr.ui.jobs import CANCELLED, DONE, FAILED


def test_merge_report_equals_what_the_command_printed(merged):
    assert merged.printed is not None and merged.summary == merged.printed
    reopened = tasks.merge_summary(merged.report, merged.printed["out"])
    timings = reopened.pop("timings_s")
    printed = dict(merged.printed)
    assert reopened == {k: v for k, v in printed.items() if k != "timings_s"}
    assert timings.keys() == printed["timings_s"].keys()
    assert all(abs(timings[k] - printed["timings_s"][k]) <= 0.011 for k in timings)
    assert set(merged.concepts) == set(tasks.DEFAULT_CONCEPTS)
    for label in ("merged LoRA (kohya)", "merged LoRA (diffusers)", "recipe (resolved)"):
        assert merged.files[label].is_file()
    # the report's numbers are the ones in the table the page shows
    for name, d in merged.printed["fidelity"].items():
        assert f"| {name} | {d['merged']:.4f} | {d['sum']:.4f} |" in merged.markdown()


def test_reopened_merge_is_the_same(settings, merged):
    again = tasks.open_merge(str(merged.path), settings.folders)
    assert again.summary["fidelity"] == merged.summary["fidelity"] and again.files == merged.files
    assert display(merged.path) in tasks.list_merges(settings.folders)


def test_picker_inserts_the_words_the_lora_was_trained_with(merged):
    assert merged.insert_text("rubo") == "a <rubo1> <rubo2> <rubo3> creature"


def compose(merged, **kw):
    base = dict(model=str(merged.path), prompt=f"{{rubo}} on the left and {merged.insert_text('rika')} on the right",
                regions=((0, 0.25, 0.5, 1, "{rubo}"), (0.5, 0.25, 1, 1, merged.insert_text("rika"))),
                seeds=2, steps=3, naive=True, layout=True)
    return tasks.Compose(**{**base, **kw})


def test_page_images_equal_the_command_images(settings, merged, tmp_path, run_job, cli):
    import torch

    torch.set_num_threads(1)  # the commands below say --threads 1 (Settings.threads)
    c = compose(merged)
    job = run_job("generate", lambda job: tasks.run_generate(job, settings, c, tasks.ModelCache()))
    assert job.state == DONE, job.message
    result = job.result
    assert set(result.images) == {"merged", "naive"}
    for column, argv in result.commands.items():
        out = tmp_path / column
        assert cli([*argv[:-1], str(out)])[0] == 0
        for idx, image in enumerate(result.images[column]):
            from_cli = np.asarray(Image.open(out / f"000-{idx}.png").convert("RGB"))
            assert np.array_equal(np.asarray(image), from_cli), (column, idx)
    # merged and naive stacking draw different images from the same noise
    assert not np.array_equal(np.asarray(result.images["merged"][0]), np.asarray(result.images["naive"][0]))

    saved = tasks.save_generated(settings, result)
    files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*.png"))
    assert files == ["merged/000-0.png", "merged/000-1.png", "naive/000-0.png", "naive/000-1.png"]
    assert "loraclr generate" in Image.open(saved / "merged" / "000-0.png").text["parameters"]
    assert (saved / "settings.json").is_file()


@pytest.mark.parametrize("change, expected_in", [
    (dict(regions=((0.5, 0.2, 0.1, 1, "a creature"),)), "box"),  # x1 < x0
    (dict(regions=((0, 0, 0.5, 1, "{nobody} at the beach"),)), "unknown concept {nobody}"),
    (dict(prompt="a <nothing1> creature", regions=()), "unknown token"),
    (dict(regions=(("left", 0, 0.5, 1, "a creature"),)), "four numbers"),
])
def test_generate_errors_are_the_command_lines(settings, merged, change, expected_in, run_job, cli):
    c = compose(merged, naive=False, **change)
    job = run_job("generate", lambda job: tasks.run_generate(job, settings, c, tasks.ModelCache()))
    assert job.state == FAILED
    argv = tasks.with_output(tasks.generate_argvs(settings, c)["merged"], settings.folders.work / "x", settings)
    code, err = cli(argv)
    assert code == 2
    assert job.message == err.strip().splitlines()[-1]  # after the loading bars
    assert job.message.startswith("loraclr generate: error: ") and expected_in in job.message
    assert "Traceback" not in job.message


def test_merge_errors_are_the_command_lines(settings, concept_rows, run_job, cli):
    rows = concept_rows(settings)
    rows[1][0] = rows[0][0]  # two concepts of the same name
    recipe = tasks.recipe_dict(settings, rows, "loraclr", [])
    plan = tasks.plan_merge(settings, recipe, "dupes")
    job = run_job("merge", lambda job: tasks.run_merge(job, plan))
    assert job.state == FAILED
    code, err = cli(plan.argv)
    assert code == 2 and job.message == err.strip().splitlines()[-1]
    assert "duplicate names ['rubo']" in job.message
    assert not plan.out_dir.exists()


def test_cancelled_generation_stops_and_saves_nothing(settings, merged):
    c = compose(merged, steps=200, seeds=4)
    from loraclr.ui.jobs import JobRunner

    runner = JobRunner()
    job = runner.start("generate", lambda job: tasks.run_generate(job, settings, c, tasks.ModelCache()))
    while job.phase != "drawing (merged)" and not job.done:
        job.wait(0.05)
    runner.cancel()
    assert job.wait(60)
    assert job.state == CANCELLED and job.result is None
    assert job.message == "loraclr generate: cancelled; nothing was written"
    assert job.fraction is not None and job.fraction < 0.5  # stopped inside the first column


def test_cancelled_merge_leaves_nothing(settings, concept_rows):
    recipe = tasks.recipe_dict(settings, concept_rows(settings), "loraclr", [])
    plan = tasks.plan_merge(settings, recipe, "cancelled")
    from loraclr.ui.jobs import JobRunner

    runner = JobRunner()
    job = runner.start("merge", lambda job: tasks.run_merge(job, plan))
    while not job.phase.startswith("Loading") and not job.done:  # the child is inside the merge
        job.wait(0.05)
    runner.cancel()
    assert job.wait(120)
    if job.state != CANCELLED:  # on a loaded machine the merge may finish before the Ctrl-C reaches it
        assert job.state == "done" and (plan.out_dir / "report.json").is_file(), job.message
    else:
        assert not plan.out_dir.exists()
    leftovers = [p.name for p in plan.out_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_method_settings_sent_are_the_changed_ones():
    rows = tasks.settings_rows("loraclr")
    assert tasks.changed_settings("loraclr", rows) == {}
    rows = [[k, "0.25" if k == "margin" else v] for k, v in rows]
    assert tasks.changed_settings("loraclr", rows) == {"margin": 0.25}
    # a new mode starts from the config's defaults: the preset's values the user saw are kept explicitly
    rows = [[k, "paper" if k == "mode" else v] for k, v in tasks.settings_rows("loraclr")]
    changed = tasks.changed_settings("loraclr", rows)
    assert changed["mode"] == "paper" and changed["anchor"] == "mean" and changed["ridge"] == 0.1


def test_recipe_of_the_page_is_a_valid_recipe(settings, concept_rows):
    from loraclr.recipe import recipe_from_dict

    d = tasks.recipe_dict(settings, concept_rows(settings), "average", tasks.settings_rows("average"),
                          feature_steps=3, rank=8)
    r = recipe_from_dict(d)
    assert [c.name for c in r.concepts] == list(tasks.DEFAULT_CONCEPTS)
    assert r.method.name == "average" and r.features.steps == 3 and r.output.rank == 8
    assert r.concepts[0].trigger == "<rubo1> <rubo2> <rubo3>"
    assert r.concepts[0].prompts == ("a {trigger} creature", "{trigger}")
