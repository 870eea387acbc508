"""``loraclr ui``: a local web page to merge concept LoRAs, draw a box per character and generate
(see :mod:`loraclr.ui` and docs/ui.md). Needs the ``ui`` extra: ``pip install -e ".[ui]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

from loraclr.runtime import choose_threads

DEFAULT_FOLDER = "loraclr-ui"
LOCALHOST = "127.0.0.1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", action="append", default=[], metavar="DIR",
                   help="a folder the page may read and write (repeatable); the first holds its outputs "
                        f"(merges/, images/, recipes/, uploads/). Default: ./{DEFAULT_FOLDER}. The page touches "
                        "no other file, except the built-in world's (read only)")
    p.add_argument("--host", default=LOCALHOST,
                   help=f"address to listen on (default {LOCALHOST}: this computer only). Any other address lets "
                        "everyone who can reach it use the page and its folders")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .pt/.pth/.ckpt/.bin LoRA files (loaded weights-only); refused otherwise")
    p.add_argument("--max-upload-mb", type=int, default=1024, metavar="MB", help="largest upload (default 1024)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for generating and for the merges it starts (default: the free cores)")


def run(args) -> int:
    if importlib.util.find_spec("gradio") is None:
        raise ValueError('the web page needs gradio: pip install -e ".[ui]"')
    if args.max_upload_mb < 1:
        raise ValueError(f"--max-upload-mb must be >= 1, got {args.max_upload_mb}")
    from loraclr.ui.app import launch, make_settings

    choose_threads(args.threads)
    if getattr(args, "verbose", 0) < 1:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per page request buries the rest
    settings = make_settings(args.folder or [DEFAULT_FOLDER], allow_pickle=args.allow_pickle, threads=args.threads)
    if args.host not in (LOCALHOST, "localhost", "::1"):
        bar = "!" * 78
        print(f"{bar}\nWARNING: listening on {args.host}: ANYONE who can reach this address can use the page,\n"
              f"read and write files in {', '.join(map(str, settings.folders.roots))}, and run merges on this "
              f"computer.\nThere is no login. Use --host {LOCALHOST} unless you trust the network.\n{bar}",
              file=sys.stderr, flush=True)
    print(f"loraclr ui: work folder {settings.folders.work}" + (" (pickles allowed)" if args.allow_pickle else ""),
          file=sys.stderr, flush=True)
    launch(settings, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
           open_browser=not args.no_browser)
    return 0
