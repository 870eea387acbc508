"""The page: three tabs (Merge, Compose, Evaluate) over :mod:`loraclr.ui.tasks`, long work through one
:class:`~loraclr.ui.jobs.JobRunner`.

Every handler turns errors into the CLI's one line (shown in the tab's status box); a running job is followed
by a generator that yields its progress a few times a second, so the page stays live and the cancel button
(its own event) can reach the job.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import gradio as gr

from loraclr.regional import DEFAULT_START, MODES
from loraclr.ui import boxes, tasks
from loraclr.ui.canvas import canvas_value, data_uri, region_canvas
from loraclr.ui.folders import Folders, display
from loraclr.ui.jobs import DONE, JobRunner, error_message
from loraclr.ui.tasks import Compose, Settings

POLL_S = 0.3
INTRO = """### loraclr: merge concept LoRAs, then draw the characters together
**Merge** picks LoRA files and merges them into one model; **Compose** draws a box per character and
generates; **Evaluate** scores a merge in the miniature world. The page starts on the built-in miniature world:
press *Merge*, then *Generate* on the Compose tab."""

CSS = """
#merge-status, #compose-status, #evaluate-status { font-family: monospace; }
"""


def _pretty_command(argv: list[str]) -> str:
    return "loraclr " + shlex.join(argv)


def build_app(settings: Settings):
    """The gr.Blocks of the page."""
    runner = JobRunner()
    cache = tasks.ModelCache()
    folders = settings.folders
    last_generated: dict[str, Any] = {}

    def merges() -> list[str]:
        return tasks.list_merges(folders)

    # --- Merge tab handlers -------------------------------------------------------------------------

    def list_files(folder: str):
        try:
            files = folders.list_loras(folder)
        except Exception as e:
            return gr.update(choices=[], value=[]), error_message("inspect", e)
        names = [display(p) for p in files]
        by_stem = {Path(n).stem: n for n in names}
        picked = [by_stem[c] for c in tasks.DEFAULT_CONCEPTS if c in by_stem]
        return gr.update(choices=[(Path(n).name, n) for n in names], value=picked), f"{len(names)} LoRA files in {folder}"

    def upload(files, _picked):
        paths, lines = [], []
        for f in files or []:
            try:
                paths.append(display(tasks.store_upload(settings, f)))
            except Exception as e:
                lines.append(error_message("inspect", e))
        if not paths:
            return gr.update(), gr.update(), "\n".join(lines) or "nothing uploaded"
        up = folders.work / tasks.UPLOADS
        choices = [(p.name, display(p)) for p in folders.list_loras(up)]
        return (gr.update(value=display(up)), gr.update(choices=choices, value=paths),
                "\n".join(lines + [f"uploaded {len(paths)} file(s) to {up}"]))

    def inspect_files(selected: list[str]):
        rows, lines = [], []
        for path in selected or []:
            try:
                row, err = tasks.concept_row(settings, path)
            except Exception as e:
                row, err = None, error_message("inspect", e)
            if row is not None:
                rows.append(row)
            if err:
                lines.append(err)
        return rows, "\n".join(lines) or f"{len(rows)} concept(s); edit a trigger or strength in the table"

    def method_changed(name: str):
        return tasks.settings_rows(name)

    def merge_name(concepts, method):
        names = [str(r[0]) for r in boxes_rows(concepts)][:3]
        return "-".join(names + [method]) if names else method

    def start_merge(concepts, method, method_rows, feature_steps, rank, name, overwrite):
        none = gr.update()
        try:
            recipe = tasks.recipe_dict(settings, boxes_rows(concepts), method, boxes_rows(method_rows),
                                       feature_steps=_number(feature_steps, "feature steps", int),
                                       rank=_number(rank, "rank", int))
            plan = tasks.plan_merge(settings, recipe, name.strip(), bool(overwrite))
            job = runner.start("merge", lambda job: tasks.run_merge(job, plan))
        except Exception as e:
            yield error_message("merge", e), none, none, none, none, none
            return
        command = plan.command
        while not job.wait(POLL_S):
            yield job.status_line(), command, none, none, none, none
        if job.state != DONE:
            yield job.status_line(), command, none, none, none, none
            return
        view = job.result
        notes = "".join(f"\nwarning: {n}" for n in job.notes)
        yield (job.status_line() + notes, command, view.markdown(), [str(p) for p in view.files.values()],
               view.recipe_text, gr.update(choices=merges(), value=display(view.path)))

    def cancel():
        """Set the running job's flag; its own status line then says it is cancelling. (Written into that
        status box from here too, the line could race with the running job's updates of it.)"""
        job = runner.cancel()
        if job is None or job.done:
            gr.Info("nothing is running")

    def reopen(path: str):
        try:
            view = tasks.open_merge(path, folders)
        except Exception as e:
            return error_message("merge", e), gr.update(), gr.update(), gr.update()
        return (f"opened {display(view.path)}", view.markdown(), [str(p) for p in view.files.values()], view.recipe_text)

    # --- Compose tab handlers -----------------------------------------------------------------------

    def model_changed(model: str, prompt: str, rows):
        """The concepts of the chosen merge, the layout adapter where the base is the world's; an empty page gets
        a two-character layout to start from."""
        if not model:
            return gr.update(choices=[]), gr.update(), gr.update(), gr.update(), gr.update()
        try:
            view = tasks.open_merge(model, folders)
        except Exception as e:
            return gr.update(choices=[]), gr.update(), gr.update(), gr.update(), error_message("generate", e)
        names = list(view.concepts)
        picker = gr.update(choices=names, value=names[0] if names else None)
        layout = gr.update(value=view.base == "mini")  # the world's adapter fits the world's base only
        if (prompt or "").strip() or boxes.clean_rows(rows) or len(names) < 2:
            return picker, gr.update(), gr.update(), layout, ""
        a, b = (view.insert_text(n) for n in names[:2])
        new_rows = [[*box, text] for box, text in zip(tasks.DEFAULT_BOXES, (a, b), strict=True)]
        return picker, f"{a} on the left and {b} on the right", new_rows, layout, "a box for each of two concepts"

    def drawn(rows, evt: gr.EventData):
        box = getattr(evt, "box", None) or (evt._data or {}).get("box")
        return boxes.add_box(rows, box)

    def insert_concept(model, concept, region, rows):
        try:
            view = tasks.open_merge(model, folders)
            return boxes.insert_text(rows, int(region), view.insert_text(concept)), gr.update()
        except Exception as e:
            return gr.update(), error_message("generate", e)

    def start_generate(model, prompt, negative, rows, mode, start, seeds, seed, steps, guidance, layout, naive):
        none = gr.update()
        try:
            compose = Compose(model=model or "", prompt=prompt or "", regions=tuple(map(tuple, boxes.clean_rows(rows))),
                              negative=negative or "", mode=mode, start=_number(start, "regions act from", float),
                              seeds=_number(seeds, "images", int), seed=_number(seed, "first seed", int),
                              steps=_number(steps, "steps", int), guidance=_number(guidance, "guidance", float),
                              layout=bool(layout), naive=bool(naive))
            if not compose.model:
                raise FileNotFoundError("no merged model yet: merge on the Merge tab, or open a finished merge")
            job = runner.start("generate", lambda job: tasks.run_generate(job, settings, compose, cache))
        except Exception as e:
            yield error_message("generate", e), none, none, none
            return
        while not job.wait(POLL_S):
            yield job.status_line(), none, none, none
        if job.state != DONE:
            yield job.status_line(), none, none, none
            return
        result = job.result
        last_generated["result"] = result
        gallery = [(im, f"{column} · seed {compose.seed + i % compose.seeds}")
                   for column, images in result.images.items() for i, im in enumerate(images)]
        commands = "\n".join(_pretty_command(v) for v in result.commands.values())
        first = next(iter(result.images.values()))[0]  # the merged model's first seed, behind the boxes
        yield job.status_line(), gallery, commands, data_uri(first)

    def save():
        result = last_generated.get("result")
        if result is None:
            return "nothing generated yet"
        try:
            return f"saved to {display(tasks.save_generated(settings, result))}"
        except Exception as e:
            return error_message("generate", e)

    # --- Evaluate tab handlers ----------------------------------------------------------------------

    def start_evaluate(model, suite, prompts, seeds, steps):
        try:
            argv, out = tasks.plan_evaluate(settings, model or "", suite, _number(prompts, "prompts", int),
                                            _number(seeds, "seeds", int), _number(steps, "steps", int))
            job = runner.start("evaluate", lambda job: tasks.run_evaluate(job, argv, out))
        except Exception as e:
            yield error_message("evaluate", e), gr.update(), gr.update()
            return
        while not job.wait(POLL_S):
            yield job.status_line(), _pretty_command(argv), gr.update()
        yield job.status_line(), _pretty_command(argv), job.result if job.state == DONE else gr.update()

    # --- layout -------------------------------------------------------------------------------------

    method_names = [name for _, name in tasks.method_choices()]
    first_method = "loraclr" if "loraclr" in method_names else method_names[0]
    initial_merges: list[str] = []  # filled on load
    with gr.Blocks(title="loraclr") as page:
        gr.Markdown(INTRO)
        gr.Markdown(f"Work folder: `{display(folders.work)}`" + (f"; also `{'`, `'.join(map(display, folders.roots[1:]))}`"
                                                         if len(folders.roots) > 1 else ""))
        with gr.Tabs():
            with gr.Tab("Merge", id="merge"):
                with gr.Row():
                    folder = gr.Textbox(tasks.default_folder(), label="Folder of LoRA files", scale=4)
                    list_btn = gr.Button("List files", scale=1)
                files = gr.CheckboxGroup([], label="LoRA files to merge", elem_id="merge-files")
                with gr.Accordion("Upload LoRA files", open=False):
                    uploads = gr.File(file_count="multiple", label="LoRA files (.safetensors; pickles only with "
                                      "--allow-pickle)", file_types=[".safetensors", ".pt", ".pth", ".ckpt", ".bin"])
                concepts = gr.Dataframe(headers=tasks.CONCEPT_COLUMNS, datatype=["str", "str", "number", "str", "str",
                                        "str", "str", "str"], type="array", interactive=True, column_count=8,
                                        label="Concepts (what `loraclr inspect` says; edit name, trigger, strength)",
                                        static_columns=[3, 4, 5, 6, 7], elem_id="merge-concepts")
                inspect_note = gr.Markdown()
                with gr.Row():
                    method = gr.Dropdown(tasks.method_choices(), value=first_method, label="Method", scale=3)
                    feature_steps = gr.Number(5, label="Feature steps", precision=0, minimum=1, scale=1)
                    rank = gr.Number(64, label="Rank of the merged LoRA", precision=0, minimum=1, scale=1)
                with gr.Accordion("Method settings (the method's defaults)", open=False):
                    method_rows = gr.Dataframe(tasks.settings_rows(first_method), headers=["setting", "value"],
                                               datatype=["str", "str"], type="array", column_count=2,
                                               interactive=True, static_columns=[0])
                with gr.Row():
                    name = gr.Textbox("merge", label="Name of the merge (a folder under merges/)", scale=3)
                    overwrite = gr.Checkbox(False, label="Replace a merge of that name", scale=1)
                with gr.Row():
                    merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-button")
                    merge_cancel = gr.Button("Cancel", variant="stop", elem_id="merge-cancel")
                merge_status = gr.Textbox(label="Status", interactive=False, elem_id="merge-status")
                merge_command = gr.Code(label="The same from the command line", language="shell", interactive=False,
                                        lines=2)
                report = gr.Markdown(elem_id="merge-report")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                    elem_id="merge-downloads")
                with gr.Accordion("Recipe (resolved)", open=False):
                    recipe_view = gr.Code(language="yaml", interactive=False)
                with gr.Row():
                    finished = gr.Dropdown(initial_merges, value=initial_merges[0] if initial_merges else None,
                                           label="Finished merges", allow_custom_value=True, scale=4)
                    open_btn = gr.Button("Open", scale=1)

            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    model = gr.Dropdown(initial_merges, value=initial_merges[0] if initial_merges else None,
                                        label="Merged model", allow_custom_value=True, elem_id="compose-model")
                prompt = gr.Textbox(label="Global prompt", lines=2, elem_id="compose-prompt")
                negative = gr.Textbox(label="Negative prompt", value="")
                with gr.Row():
                    with gr.Column(scale=2):
                        canvas = region_canvas(elem_id="region-canvas")
                        backdrop = gr.State("")  # the last image drawn, as a data URI
                    with gr.Column(scale=3):
                        regions = gr.Dataframe(headers=boxes.COLUMNS, datatype=["number"] * 4 + ["str"],
                                               type="array", column_count=5, interactive=True,
                                               label="Regions: x0, y0, x1, y1 in [0, 1] (top left 0, 0) and the "
                                                     "prompt inside the box", elem_id="compose-regions")
                        with gr.Row():
                            remove_last = gr.Button("Remove last region", size="sm")
                            clear = gr.Button("Clear regions", size="sm", elem_id="clear-regions")
                        with gr.Row():
                            concept = gr.Dropdown([], label="Concept", scale=2, elem_id="concept-picker")
                            region_no = gr.Number(1, label="Region", precision=0, minimum=1, scale=1)
                            insert = gr.Button("Insert trigger", scale=1, elem_id="insert-trigger")
                with gr.Row():
                    seeds = gr.Number(tasks.DEFAULT_SEEDS, label="Images (seeds)", precision=0, minimum=1)
                    seed = gr.Number(0, label="First seed", precision=0)
                    steps = gr.Number(tasks.DEFAULT_STEPS, label="Steps", precision=0, minimum=1, elem_id="compose-steps")
                    guidance = gr.Number(tasks.DEFAULT_GUIDANCE, label="Guidance")
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=MODES[0], label="Region mode")
                    start = gr.Slider(0.0, 0.95, value=DEFAULT_START, step=0.05, label="Regions act from (fraction of "
                                      "the steps)")
                    layout = gr.Checkbox(True, label="Layout adapter (miniature world: a character in each box)")
                    naive = gr.Checkbox(True, label="Side by side with naive stacking")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    generate_cancel = gr.Button("Cancel", variant="stop", elem_id="generate-cancel")
                compose_status = gr.Textbox(label="Status", interactive=False, elem_id="compose-status")
                gallery = gr.Gallery(label="Images", columns=4, height=340, object_fit="contain",
                                     elem_id="compose-gallery")
                generate_command = gr.Code(label="The same from the command line", language="shell",
                                           interactive=False, lines=2)
                with gr.Row():
                    save_btn = gr.Button("Save images with their settings")
                    saved = gr.Textbox(label="Saved", interactive=False)

            with gr.Tab("Evaluate", id="evaluate"):
                gr.Markdown("Scores a merge with the miniature world's evaluators (text, image and identity "
                            "alignment), as `loraclr evaluate` does.")
                with gr.Row():
                    eval_model = gr.Dropdown(initial_merges, value=initial_merges[0] if initial_merges else None,
                                             label="Merged model", allow_custom_value=True)
                    suite = gr.Radio(["single", "multi"], value="single", label="Suite")
                    eval_prompts = gr.Number(1, label="Prompts per concept", precision=0, minimum=1)
                    eval_seeds = gr.Number(2, label="Seeds", precision=0, minimum=1)
                    eval_steps = gr.Number(tasks.DEFAULT_STEPS, label="Steps", precision=0, minimum=1,
                                           elem_id="evaluate-steps")
                with gr.Row():
                    eval_btn = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
                    eval_cancel = gr.Button("Cancel", variant="stop")
                eval_status = gr.Textbox(label="Status", interactive=False, elem_id="evaluate-status")
                eval_command = gr.Code(label="The same from the command line", language="shell", interactive=False,
                                        lines=2)
                scores = gr.Markdown(elem_id="evaluate-table")

        # --- wiring -------------------------------------------------------------------------------------
        list_btn.click(list_files, folder, [files, inspect_note])
        folder.submit(list_files, folder, [files, inspect_note])
        uploads.upload(upload, [uploads, files], [folder, files, inspect_note])
        files.change(inspect_files, files, [concepts, inspect_note]).then(merge_name, [concepts, method], name)
        method.change(method_changed, method, method_rows).then(merge_name, [concepts, method], name)
        merge_btn.click(start_merge, [concepts, method, method_rows, feature_steps, rank, name, overwrite],
                        [merge_status, merge_command, report, downloads, recipe_view, finished])
        merge_cancel.click(cancel, None, None)
        open_btn.click(reopen, finished, [merge_status, report, downloads, recipe_view])
        # a new merge becomes the model of the other tabs
        finished.change(lambda v: (gr.update(choices=merges(), value=v), gr.update(choices=merges(), value=v)),
                        finished, [model, eval_model])

        model.change(model_changed, [model, prompt, regions], [concept, prompt, regions, layout, compose_status])
        regions.change(canvas_value, [regions, backdrop], canvas)
        canvas.submit(drawn, regions, regions)
        remove_last.click(lambda rows: boxes.clean_rows(rows)[:-1], regions, regions)
        clear.click(lambda: [], None, regions)
        insert.click(insert_concept, [model, concept, region_no, regions], [regions, compose_status])
        generate_btn.click(start_generate, [model, prompt, negative, regions, mode, start, seeds, seed, steps,
                                            guidance, layout, naive],
                           [compose_status, gallery, generate_command, backdrop]
                           ).then(canvas_value, [regions, backdrop], canvas)
        generate_cancel.click(cancel, None, None)
        save_btn.click(save, None, saved)

        eval_btn.click(start_evaluate, [eval_model, suite, eval_prompts, eval_seeds, eval_steps],
                       [eval_status, eval_command, scores])
        eval_cancel.click(cancel, None, None)

        page.load(list_files, folder, [files, inspect_note])

        def refresh_merges():
            """Merges finished since the page was built (their .change fills the Compose tab)."""
            found = merges()
            first = found[0] if found else None
            return tuple(gr.update(choices=found, value=first) for _ in range(3))

        page.load(refresh_merges, None, [finished, model, eval_model])
    return page


def _number(value, label: str, kind: type):
    """A number field's value as ``kind``; an emptied field gets one line naming it."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: give a number, got {value!r}") from None


def boxes_rows(value) -> list[list]:
    """A table widget's value as rows (its blank lines dropped)."""
    return boxes.clean_rows(value)


def launch(settings: Settings, *, host: str = "127.0.0.1", port: int | None = None, max_upload_mb: int = 1024,
           open_browser: bool = True) -> None:
    """Build the page and serve it until interrupted; files only from the named folders."""
    tasks.preload()
    page = build_app(settings)
    page.queue(default_concurrency_limit=4)
    page.launch(server_name=host, server_port=port, inbrowser=open_browser, show_error=False,
                allowed_paths=[str(r) for r in settings.folders.roots], max_file_size=f"{max_upload_mb}mb",
                ssr_mode=False, footer_links=[], css=CSS, quiet=False)


def make_settings(folders: list[str], allow_pickle: bool = False, threads: int | None = None) -> Settings:
    return Settings(Folders.create(folders), allow_pickle=allow_pickle, threads=threads)
