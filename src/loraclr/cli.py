"""The ``loraclr`` command line: a thin layer that parses, builds a config and calls one library function.

Each subcommand lives in ``loraclr.commands.<module>`` with two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command runs,
so ``loraclr --help`` stays fast and a broken optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# command name -> (module under loraclr.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "show what a LoRA / embedding file contains"),
    "convert": ("convert", "convert a LoRA file between kohya and diffusers formats"),
    "merge": ("merge", "merge concept LoRAs into one model (LoRACLR and baselines)"),
    "generate": ("generate", "generate images from a merged model or base + LoRAs"),
    "evaluate": ("evaluate", "text / image / identity alignment of a model"),
    "train-lora": ("train_lora", "train a concept LoRA (DreamBooth-LoRA / ED-LoRA style)"),
    "demo": ("demo", "merge, generate and evaluate on the built-in miniature world"),
    "ui": ("ui", "a local web page: merge, draw regions and generate (needs the ui extra)"),
}

# Exceptions that are the user's to fix: one line, no traceback. The web page shows the same line.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError)


def error_line(command: str, error: BaseException) -> str:
    """``loraclr COMMAND: error: MESSAGE`` for a user error (a KeyError's message without its quotes)."""
    msg = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"loraclr {command}: error: {msg}"


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"loraclr.commands.{module}")


def _available() -> dict[str, str]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(f"loraclr.commands.{module}") is not None:
            out[name] = help_
    return out


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Parser for all available commands (only the selected command's module is imported)."""
    parser = argparse.ArgumentParser(prog="loraclr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in (argv or []) if a in COMMANDS), None)
    for name, help_ in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:
            _load(name).add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.INFO, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_load(args.command).run(args) or 0)
    except USER_ERRORS as e:
        # User errors: one clear line, no traceback (use -vv to see it).
        if args.verbose >= 2:
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: the writers' cleanup ran as the exception unwound (atomic writes, spill folders); one line and
        # the shell's code for SIGINT, no traceback
        if args.verbose >= 2:
            raise
        print(f"loraclr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
