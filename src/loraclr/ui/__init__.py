"""The web page (``loraclr ui``): merge concept LoRAs, draw regions and generate, in a browser.

Modules: :mod:`~loraclr.ui.folders` (which files the page may touch), :mod:`~loraclr.ui.jobs` (long work
in the background, with progress and cancel), :mod:`~loraclr.ui.tasks` (merge, generate and evaluate as the
commands do them), :mod:`~loraclr.ui.canvas` (the box-drawing canvas), :mod:`~loraclr.ui.app` (the page).
Only ``app`` and ``canvas`` need gradio (the ``ui`` extra).
"""

import os

# the page is local: no usage statistics sent to gradio's servers (set before gradio is first imported)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
