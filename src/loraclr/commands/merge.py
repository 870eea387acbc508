"""``loraclr merge RECIPE -o OUT``: merge concept LoRAs into one model (see :mod:`loraclr.merging`)."""

from __future__ import annotations

import argparse
import json
import sys

from loraclr.merge.api import all_methods, describe_settings, get_method
from loraclr.runtime import PRECISION_NAMES, add_runtime_arguments, apply_runtime, quiet_libraries


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML/JSON, or the official LoRACLR concept JSON list")
    p.add_argument("-o", "--out", required=True, help="output folder (must not exist, nor lie inside an input)")
    p.add_argument("--base", help="base model: diffusers folder, checkpoint file or 'mini' (overrides the recipe)")
    p.add_argument("--base-config", help="diffusers folder with the configs of a single-file base checkpoint")
    p.add_argument("--method", help="merge method: " + "; ".join(f"{m.name} = {m.summary}"
                                                               for m in all_methods().values()))
    p.add_argument("--mode", help="loraclr mode: paper (official recipe) or converged (official objective, exact); "
                   "default: the recipe's, else the recommended preset "
                   f"({describe_settings(get_method('loraclr').preset)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting, e.g. --set margin=0.25 (repeatable; values parsed as YAML)")
    p.add_argument("--rank", type=int, help="rank of the exported merged LoRA")
    p.add_argument("--steps", type=int, help="sampling steps of the spatial feature run")
    p.add_argument("--resolution", type=int, help="image side of the spatial feature run, in pixels")
    p.add_argument("--seed", type=int, help="seed of the spatial feature run")
    p.add_argument("--max-rows", type=int, help="rows kept per layer and concept (0 = all)")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow .pt/.pth/.ckpt/.bin LoRA files (loaded weights-only)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run feature collection and solves as tasks on Ray (pip install -e '.[ray]'); without "
                        "ADDRESS: the recipe's executor.address, by default a local Ray instance started for the "
                        "merge; 'auto': the cluster `ray start` runs here; HOST:PORT: that cluster "
                        "(docs/distributed.md)")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray worker processes, each holding the base model and every LoRA (default: the recipe's "
                        "executor.workers, 2)")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars, no notices from the model libraries")
    add_runtime_arguments(p, precision_default=None,
                          precision_help="here the spatial feature run's (default: the recipe's features.precision, "
                                         "auto unless it says otherwise: bf16 only where the CPU computes it "
                                         "natively)")


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_recipe(args):
    from loraclr.recipe import BaseModel, load_recipe

    recipe = load_recipe(args.recipe, base=args.base)
    if args.base_config:
        recipe = recipe.replace(base=BaseModel(recipe.base.path, config=args.base_config))
    method_changes = _parse_sets(args.set)
    if args.mode:
        method_changes["mode"] = args.mode
    changes = {
        "method.name": args.method, "output.rank": args.rank, "features.steps": args.steps,
        "features.resolution": args.resolution, "features.seed": args.seed,
        "features.max_rows": args.max_rows, "allow_pickle": args.allow_pickle,
        "executor.workers": getattr(args, "ray_workers", None),
    }
    ray = getattr(args, "ray", None)  # callers may build args without the executor flags
    if ray is not None:
        changes["executor.kind"] = "ray"
        changes["executor.address"] = ray or None  # empty: keep the recipe's
    if args.method and args.method != recipe.method.name:
        # settings belong to a method: a new method starts from its own defaults (or recommended preset)
        changes["method.settings"] = {}
    changes.update({f"method.{k}": v for k, v in method_changes.items()})
    return recipe.replace(**changes)


def run(args) -> int:
    from loraclr.executors import ExecutorError
    from loraclr.merging import merge

    if getattr(args, "quiet", False):
        quiet_libraries()
    runtime = apply_runtime(args)
    recipe = build_recipe(args)
    if runtime["precision"] is not None:
        recipe = recipe.replace(**{"features.precision": PRECISION_NAMES[runtime["precision"]]})
    try:
        summary = merge(recipe, args.out, progress=not getattr(args, "quiet", False), overwrite=args.overwrite)
    except ExecutorError as e:  # a merge that could not finish where it ran: one line, nothing written
        print(f"loraclr merge: error: {e}", file=sys.stderr)
        return 1
    out = {
        "out": str(summary.out_dir), "method": summary.method, "layers": summary.n_layers,
        "timings_s": {k: round(v, 2) for k, v in summary.timings.items()},
        "fidelity": {k: {m: round(v, 4) for m, v in d.items()} for k, d in summary.fidelity.items()},
    }
    if summary.workers:
        out["workers"] = summary.workers
    print(json.dumps(out, indent=1), file=sys.stdout)
    return 0
