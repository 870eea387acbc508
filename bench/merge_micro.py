"""Micro-benchmarks of the whole merge's hot spots on real SD 1.5 shapes, one torch thread (issue 3).

Uses the cached SD 1.5-shaped base and random rank-16 kohya LoRAs of ``bench/merge_speed.py`` (built on
first use), and times one piece of the merge at a time, so each change can be measured before and after
without a full run:

    python bench/merge_micro.py sum            # the `sum` method's per-layer path (_plain_problems + _solve)
    python bench/merge_micro.py sum --profile  # the same under cProfile
    python bench/merge_micro.py check          # the load phase's per-concept module checks
    python bench/merge_micro.py factorize      # export: factorising merged deltas to rank 64
    python bench/merge_micro.py unet           # one UNet forward per resolution and precision
    python bench/merge_micro.py solve          # one layer's converged / lstsq solve, solver eigh vs auto
    PYTHONPATH=<old checkout>/src python bench/merge_micro.py solve --solvers default   # the same, older code

``--layers sample`` (default) takes one layer of each distinct SD 1.5 shape (text encoder and UNet);
``--layers all`` every default kohya module (264). Times are the best of ``--repeat`` runs: the cores are
shared, and the minimum is the least disturbed by other jobs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _merge_speed():
    spec = importlib.util.spec_from_file_location("merge_speed", HERE / "merge_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(cache: Path, n: int):
    """The cached base pipeline (loaded) and N concepts as the merge sees them."""
    from diffusers import StableDiffusionPipeline

    from loraclr.features.collect import ConceptFeaturesInput
    from loraclr.io import load_lora

    ms = _merge_speed()
    base = ms.build_base(cache, "real")
    specs = ms.build_loras(cache, base, n, 16, 0.1)
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    loras = [load_lora(c["lora"], unet_config=dict(pipe.unet.config)) for c in specs]
    concepts = [ConceptFeaturesInput(c["name"], dict(lora.layers), {"unet": 1.0, "text_encoder": 1.0}, [],
                                     c["trigger"]) for c, lora in zip(specs, loras, strict=True)]
    return pipe, loras, concepts


def pick_layers(pipe, keys: list[str], which: str) -> list[str]:
    """All keys, or the first key of each distinct (component, weight shape)."""
    from loraclr.lora import split_key
    from loraclr.models import find_module

    if which == "all":
        return keys
    seen, out = set(), []
    for k in keys:
        sig = (split_key(k)[0], tuple(find_module(pipe, k).weight.shape))
        if sig not in seen:
            seen.add(sig)
            out.append(k)
    return out


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, res = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return min(times), res


def bench_sum(args) -> dict:
    from loraclr.merge.methods import get_method, make_config
    from loraclr.merging import _plain_problems, _solve
    from loraclr.models import find_module

    pipe, _, concepts = inputs(Path(args.cache), args.n)
    keys = pick_layers(pipe, sorted({k for c in concepts for k in c.layers}), args.layers)
    spec, cfg = get_method("sum"), make_config("sum")
    per_layer = {}
    for k in keys:
        dt, _ = best_of(lambda k=k: _solve(_plain_problems(pipe, concepts, [k]), spec, cfg, "all", False, {}, 1),
                        args.repeat)
        per_layer[k] = {"shape": list(find_module(pipe, k).weight.shape), "s": dt}
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        _solve(_plain_problems(pipe, concepts, keys), spec, cfg, "all", False, {}, len(keys))
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(20)
    return {"layers": per_layer, "total_s": sum(v["s"] for v in per_layer.values())}


def bench_check(args) -> dict:
    from loraclr.merging import _check_lora_fits

    pipe, loras, _ = inputs(Path(args.cache), args.n)
    dt, _ = best_of(lambda: [_check_lora_fits(pipe, lora, "sd1", "bench") for lora in loras], args.repeat)
    return {"check_lora_fits_s": dt, "lora_modules": sum(len(lora.layers) for lora in loras)}


def bench_factorize(args) -> dict:
    """Factorise the exact sum of the N deltas (rank <= 16 N) at each sampled shape, at ``--rank``."""
    from loraclr.io import factorize
    from loraclr.merge.methods import get_method, make_config
    from loraclr.merging import _plain_problems, _solve
    from loraclr.models import find_module

    pipe, _, concepts = inputs(Path(args.cache), args.n)
    keys = pick_layers(pipe, sorted({k for c in concepts for k in c.layers}), args.layers)
    offsets = _solve(_plain_problems(pipe, concepts, keys), get_method("sum"), make_config("sum"), "all", False,
                     {}, len(keys))
    per_layer = {}
    for k in keys:
        d = offsets[k].reshape(find_module(pipe, k).weight.shape)
        dt, (_, err) = best_of(lambda d=d: factorize(d, rank=args.rank), args.repeat)
        per_layer[k] = {"shape": list(d.shape), "s": dt, "rel_error": err}
    return {"rank": args.rank, "layers": per_layer, "total_s": sum(v["s"] for v in per_layer.values())}


def bench_unet(args) -> dict:
    """One UNet forward (batch of one prompt, as the spatial feature run) per resolution and precision."""
    from loraclr.features.collect import _autocast

    ms = _merge_speed()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(ms.build_base(Path(args.cache), "real")), subfolder="unet")
    unet.eval()
    states = torch.randn(1, 77, unet.config.cross_attention_dim)
    out = {}
    sf = 2 ** (len(unet.config.block_out_channels) - 1)  # latent side must divide by the UNet's downsampling
    for precision in args.precisions:  # warm-up once per precision at the smallest size: pages weights in
        side = max(sf, min(args.resolutions) // 8 // sf * sf)
        with torch.no_grad(), _autocast(precision, torch.device("cpu")):
            unet(torch.randn(1, unet.config.in_channels, side, side), 500, encoder_hidden_states=states)
    for res in args.resolutions:
        for precision in args.precisions:
            lat = torch.randn(1, unet.config.in_channels, res // 8, res // 8)

            def fwd(lat=lat, precision=precision):
                with torch.no_grad(), _autocast(precision, torch.device("cpu")):
                    return unet(lat, 500, encoder_hidden_states=states).sample

            dt, _ = best_of(fwd, args.repeat)
            out[f"{res}px {precision}"] = dt
            print(f"{res}px {precision}: {dt:.2f} s", flush=True)
    return out


def _solve_speed():
    spec = importlib.util.spec_from_file_location("solve_speed", HERE / "solve_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_solve(args) -> dict:
    """One random layer problem of ``bench/solve_speed.py`` (``--layer``: index into its list; default
    ff.net.2, 5120 -> 1280, at ``--rows`` rows per concept), solved by converged and lstsq with each
    ``--solvers`` entry; offsets compared with the first solver's (the reference when it is eigh)."""
    from loraclr.merge.methods import merge_offsets
    from loraclr.recipe import RECOMMENDED

    ss = _solve_speed()
    name, d_in, d_out, rows, _ = ss.LAYERS[args.layer]
    if args.shape:
        d_in, d_out = args.shape
        name = f"{d_in}->{d_out}"
    n_rows = args.rows or rows
    p = ss.make_problem(name, d_in, d_out, n_rows, args.n, 16, seed=args.layer)
    pf = ss.make_problem(name, d_in, d_out, n_rows, args.n, 16, seed=args.layer, factors=True)
    out = {"layer": name, "in": d_in, "out": d_out, "rows_per_concept": n_rows, "runs": {}}
    presets = {"loraclr": {"mode": "converged"}, "default": dict(RECOMMENDED["loraclr"]), "lstsq": {}}
    for label0 in args.methods:
        method = "lstsq" if label0 == "lstsq" else "loraclr"
        base = presets[label0]
        ref = None
        for solver in args.solvers:
            deltas = "dense"
            if solver.endswith("+factors"):  # the deltas as LoRA factors, as the merge passes them
                solver, deltas = solver.removesuffix("+factors"), "factors"
            prob = pf if deltas == "factors" else p
            cfg = base if solver == "default" else {**base, "solver": solver}  # default: also older code
            dt, r = best_of(
                lambda cfg=cfg, method=method, prob=prob: merge_offsets([prob], method, cfg, progress=False)[prob.key],
                args.repeat,
            )
            D = r.offset.double()
            ref = D if ref is None else ref
            rel = float((D - ref).norm() / ref.norm().clamp(min=1e-300))
            label = f"{'converged' if label0 == 'loraclr' else label0} {solver}" + (" factors" if deltas == "factors" else "")
            out["runs"][label] = {"s": dt, "loss": r.report.get("loss"), "steps": r.report.get("steps"),
                                  "hinge_active": r.report.get("hinge_active"),
                                  "rel_diff_vs_first_solver": rel}
            print(f"{label}: {dt:.2f} s  loss {r.report.get('loss')}  rel diff {rel:.2e}", flush=True)
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                torch.save(r.offset, Path(args.save) / f"{label.replace(' ', '_')}.pt")
            if args.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                merge_offsets([prob], method, cfg, progress=False)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sum", "check", "factorize", "unet", "solve"])
    ap.add_argument("--n", type=int, default=12, help="concepts")
    ap.add_argument("--layers", default="sample", choices=["sample", "all"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64, help="factorize: export rank")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 256, 128])
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--layer", type=int, default=5, help="solve: index into bench/solve_speed.py's LAYERS")
    ap.add_argument("--shape", type=int, nargs=2, metavar=("IN", "OUT"), help="solve: other layer width")
    ap.add_argument("--save", help="solve: write each offset here (to compare runs of different code)")
    ap.add_argument("--rows", type=int, default=0, help="solve: rows per concept (0: solve_speed's official)")
    ap.add_argument("--methods", nargs="+", default=["loraclr", "lstsq"], help="solve: loraclr (converged), default (the recommended preset), lstsq")
    ap.add_argument("--solvers", nargs="+", default=["eigh", "auto"], help="solve: first one is the reference; 'default' sets none (runs against code without the option); NAME+factors passes the deltas as LoRA factors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--cache", default=os.environ.get("LORACLR_BENCH_CACHE", str(Path(tempfile.gettempdir())
                                                                              / "loraclr-bench-cache")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fn = {"sum": bench_sum, "check": bench_check, "factorize": bench_factorize, "unet": bench_unet,
          "solve": bench_solve}[args.what]
    res = {"what": args.what, "threads": args.threads, "load_average": list(os.getloadavg()), **fn(args)}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
