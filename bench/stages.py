"""Where a concept's identity lives in the miniature world, and how much of each LoRA a merged layer keeps.

Why this exists: at N = 12 every merge method of ``bench/quality.py`` keeps about as much identity as the learned
tokens alone. This script measures the two things that explain it.

1. **Stage oracle** (N = 1, no merging): each identity concept drawn by the base model with its learned tokens
   and its own LoRA kept only in some stages; the other layers stay at the base weight. Rows: all stages (the own
   LoRA), spatial layers only (UNet self-attention, feed-forward, projections, cross-attention q / out), text
   encoder + cross-attention k / v only (the layers whose inputs tell concepts apart: they read the prompt), text
   encoder only, and no LoRA weight at all (tokens only). Single-concept suite of ``loraclr evaluate``.
2. **Kept effect** (merged layers): for one seeded subset per N and each method, per layer and concept
   err_i = ||X_i (D - dW_i)^T|| / ||X_i dW_i^T||: 0 when the merged offset D acts on concept i's features as its
   own LoRA does, 1 when it acts as if the LoRA were absent (more than 1: worse than absent). Measured on the
   features the merge was fitted on (*in-sample*: the bench's feature prompts, seed 0) and on features of the
   evaluation's settings ("at the beach", "in a forest", "in the snow", "in the city"; seed 1: *held-out*).
   Median over the layers of a stage of the mean over concepts.

3. **Swap oracle** (``--swap``; merged model, N = all identities by default): the merged model with one stage's
   layers replaced by the concept's own LoRA (W0 + dW_i, everything else merged), scored on that concept's single
   suite: which stage's merged layers lose the identity. Rows: merged (no swap), own spatial layers, own text
   encoder + cross-attention k, v, the own LoRA alone; identity, text, image and the identity embedder's distance
   to the intended identity, with its paired difference to the own LoRA on the same images.

    python bench/stages.py                                   # parts 1 and 2, the shipped world (~20 min, 1 core)
    python bench/stages.py --skip-oracle --skip-kept --swap --prompts 4 --out runs/x/swap   # part 3 (~15 min)
    python bench/stages.py --skip-kept --manifest runs/x/manifest.json --out runs/x/stages

Writes ``<out>.json`` (every number) and ``<out>.md`` (default ``bench/results/stages``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the sweep's Bench, sizes, subsets and method labels)

STAGES = ("text_encoder", "cross_attention", "spatial")
ORACLE = {  # row label -> the stages that keep the own LoRA
    "own LoRA (all stages)": STAGES,
    "spatial only": ("spatial",),
    "text encoder + cross-attention k, v only": ("text_encoder", "cross_attention"),
    "text encoder only": ("text_encoder",),
    "tokens only (no LoRA weight)": (),
}
HELD_OUT = ("{p} at the beach", "{p} in a forest", "{p} in the snow", "{p} in the city")
KEPT_METHODS = ("loraclr-conv-sum-ridge1e-2", "loraclr-conv-sum-ridge1e-1", "loraclr-paper", "average")
MAX_ROWS = 512  # rows per concept and layer behind err (evenly spaced), as merging.fidelity subsamples


def stage_of(pipe, keys) -> dict[str, str]:
    from loraclr.features.collect import cross_attention_keys

    cross = set(cross_attention_keys(pipe, list(keys)))
    return {k: "text_encoder" if not k.startswith("unet.") else "cross_attention" if k in cross else "spatial"
            for k in keys}


def oracle(bench: Q.Bench, names: list[str]) -> dict:
    """Part 1: per row and concept, the single suite's mean identity / text / image alignment."""
    from loraclr.models import find_module

    out: dict = {}
    for label, keep in ORACLE.items():
        per: dict = {}
        for name in names:
            m = bench.merge([name], "sum", {})  # N = 1: the base plus exactly this LoRA (and its tokens)
            with torch.no_grad():
                for key, st in stage_of(m.pipe, m.offsets).items():
                    if st not in keep:
                        w = find_module(m.pipe, key).weight
                        w.sub_(m.offsets[key].reshape(w.shape).to(w.dtype))
            res = bench.evaluate(m.model(), label, [name])
            per[name] = {k: statistics.mean(v) for k, v in Q.single_values(res["single"]["images"]).items() if v}
            print(f"{label:42s} {name:6s} " + " ".join(f"{k} {v:.2f}" for k, v in per[name].items()), flush=True)
        out[label] = {"concepts": per, "mean": {k: statistics.mean(p[k] for p in per.values() if k in p)
                                                 for k in Q.METRICS}}
    return out


@dataclasses.dataclass(frozen=True)
class _ProbeConfig:
    pass


_STORE: dict = {"D": {}, "err": {}}


def _probe(problem, config, callback=None):
    """A 'method' that returns a stored offset and records err_i on the features it is handed."""
    from loraclr.merge.api import LayerResult

    D = _STORE["D"][problem.key].reshape(problem.W0.shape).float()
    errs = []
    for X, dW in zip(problem.X, problem.deltas, strict=True):
        if X.shape[0] > MAX_ROWS:
            X = X[torch.linspace(0, X.shape[0] - 1, MAX_ROWS).round().long()]
        X, dW = X.float(), dW.float()
        errs.append(float((X @ (D - dW).T).norm() / (X @ dW.T).norm().clamp_min(1e-12)))
    _STORE["err"][problem.key] = errs
    return LayerResult(D, {"loss": None, "converged": None})


def kept(bench: Q.Bench, subsets: dict[int, list[str]], labels: list[str]) -> list[dict]:
    """Part 2: per (N, method) the median err per stage, in-sample and held-out."""
    from loraclr.merge.api import METHODS, MergeMethod, register
    from loraclr.merging import merge_model

    if "_stages_probe" not in METHODS:
        register(MergeMethod("_stages_probe", _probe, _ProbeConfig, True, "bench/stages.py diagnostic"))
    rows = []
    for n, names in subsets.items():
        for label in labels:
            method, settings = Q.METHODS[label]
            t = time.perf_counter()
            m = merge_model(bench.recipe(names, method, settings), progress=False)
            _STORE["D"] = {k: m.offsets[k].clone() for k in m.offsets}
            stages = stage_of(m.pipe, m.offsets)
            row = {"n": n, "subset": names, "method": label}
            for which in ("in-sample", "held-out"):
                r = bench.recipe(names, "_stages_probe", {})
                if which == "held-out":
                    cs = [dataclasses.replace(c, prompts=tuple(h.replace("{p}", bench.specs[c.name].prompt_phrase(
                        "{trigger}")) for h in HELD_OUT)) for c in r.concepts]
                    r = dataclasses.replace(r, concepts=tuple(cs), features=dataclasses.replace(r.features, seed=1))
                _STORE["err"] = {}
                merge_model(r, progress=False)
                for st in STAGES:
                    vals = [statistics.mean(e) for k, e in _STORE["err"].items() if stages[k] == st]
                    row[f"{which} {st}"] = statistics.median(vals) if vals else None
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            print(f"N={n} {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                if isinstance(v, float) and k != "seconds"), flush=True)
    return rows


SWAP = {  # row label -> the stages whose layers come from the concept's own LoRA instead of the merge
    "merged (no swap)": (),
    "merged, own spatial layers": ("spatial",),
    "merged, own text encoder + cross-attention k, v": ("text_encoder", "cross_attention"),
}


def swap(bench: Q.Bench, names: list[str], label: str) -> dict:
    """Part 3: per row, the single suite of each concept on the merged model with some stages swapped back."""
    from loraclr.merging import merge_model
    from loraclr.models import find_module

    method, settings = Q.METHODS[label]
    m = merge_model(bench.recipe(names, method, settings), progress=False)
    stages = stage_of(m.pipe, m.offsets)
    merged_w = {k: find_module(m.pipe, k).weight.detach().clone() for k in stages}
    images: dict[str, list] = {"own LoRA alone": [], **{row: [] for row in SWAP}}
    for name in names:  # concept by concept: its own LoRA is merged once for every row
        images["own LoRA alone"] += bench.reference(name)["single"]["images"]
        own = bench.merge([name], "sum", {})  # the base plus exactly this LoRA
        for row, own_stages in SWAP.items():
            swapped = [k for k, st in stages.items() if st in own_stages]
            with torch.no_grad():
                for k in swapped:
                    find_module(m.pipe, k).weight.copy_(find_module(own.pipe, k).weight)
            res, _ = bench.suite(bench.source(m.model(), f"{row} {name}"), [name], "single")
            images[row] += res["images"]
            with torch.no_grad():
                for k in swapped:
                    find_module(m.pipe, k).weight.copy_(merged_w[k])
    for row in SWAP:
        print(f"{row}: identity {statistics.mean(Q.single_values(images[row])['identity']):.3f}", flush=True)
    ref = {Q.image_key(r): r for r in images["own LoRA alone"]}
    out = {"method": label, "n": len(names), "subset": names, "rows": {}}
    for row, recs in images.items():
        v = Q.single_values(recs)
        per = {n: statistics.mean(float(r["identity"][0]) for r in recs if r["concepts"][0] == n) for n in names}
        dist = [r["identity_distance"][0] for r in recs]
        out["rows"][row] = {"per_concept_identity": per, **{k: Q.stat(v[k]) for k in Q.METRICS},
                            "identity_distance": statistics.mean(dist),
                            "distance_minus_own": Q.stat(Q.distance_diffs(recs, [ref[Q.image_key(r)] for r in recs])),
                            "images": recs}
    return out


def render(doc: dict) -> str:
    lines = ["# Where identity lives in the miniature world, and how much of each LoRA a merged layer keeps", "",
             f"`{doc['command']}` ({doc['date']}, commit {doc['commit'][:10]}{' + changes' if doc['dirty'] else ''}, "
             f"{doc['minutes']:.1f} min). Manifest `{doc['manifest']}`; sampling as `bench/quality.py` "
             f"({doc['sizes']['steps']} steps, guidance {doc['sizes']['guidance']:g}, {doc['sizes']['prompts']} "
             f"prompts x {doc['sizes']['seeds']} seeds per concept). See the script's docstring for the method.", ""]
    if doc.get("oracle"):
        names = list(next(iter(doc["oracle"].values()))["concepts"])
        lines += ["## 1. Stage oracle: each concept alone, its own LoRA kept only in some stages", "",
                  "Identity alignment per concept (its learned tokens are always there); mean identity / text / "
                  "image over the concepts.", "",
                  "| LoRA kept in | " + " | ".join(names) + " | identity | text | image |",
                  "|---|" + "---|" * (len(names) + 3)]
        for label, r in doc["oracle"].items():
            lines.append(f"| {label} | " + " | ".join(f"{r['concepts'][c].get('identity', float('nan')):.2f}"
                                                      for c in names)
                         + " | " + " | ".join(f"**{r['mean'][k]:.2f}**" if k == "identity" else f"{r['mean'][k]:.2f}"
                                              for k in Q.METRICS) + " |")
        lines.append("")
    if doc.get("kept"):
        lines += ["## 2. Kept effect of each LoRA in the merged layers", "",
                  "err = ||X_i (D - dW_i)^T|| / ||X_i dW_i^T|| (0: the concept's own LoRA, 1: no LoRA), median over "
                  "the layers of a stage of the mean over concepts; in-sample = the features the merge was fitted on, "
                  "held-out = features of the evaluation's settings and another seed.", "",
                  "| N | method | in-sample text enc. | in-sample cross-attn k, v | in-sample spatial | held-out text "
                  "enc. | held-out cross-attn k, v | held-out spatial |", "|---|---|---|---|---|---|---|---|"]
        for r in doc["kept"]:
            cells = [r.get(f"{w} {s}") for w in ("in-sample", "held-out") for s in STAGES]
            lines.append(f"| {r['n']} | {r['method']} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells)
                         + " |")
        lines.append("")
    if doc.get("swap"):
        sw = doc["swap"]
        names = sw["subset"]
        lines += [f"## 3. Swap oracle: the {sw['n']}-concept merge ({sw['method']}) with one stage's layers swapped back "
                  "to each concept's own LoRA", "",
                  "Identity alignment per concept on its single suite; means with 95 % intervals; distance = the identity "
                  "embedder's mean distance to the intended identity (lower is better), and its paired difference to "
                  "the own LoRA alone on the same images.", "",
                  "| model | " + " | ".join(names) + " | identity | text | image | distance | distance - own |",
                  "|---|" + "---|" * (len(names) + 5)]
        for row, r in sw["rows"].items():
            lines.append(f"| {row} | " + " | ".join(f"{r['per_concept_identity'][c]:.2f}" for c in names)
                         + f" | **{Q._f(r['identity'])}** | {Q._f(r['text'])} | {Q._f(r['image'])} | "
                         f"{r['identity_distance']:.4f} | {Q._fd(r['distance_minus_own'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=None, help="concept manifest (default: the world's)")
    ap.add_argument("--base", default="mini", help="base model (default: the built-in mini SD)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: bench/quality.py's)")
    ap.add_argument("--ns", nargs="+", type=int, default=[2, 5, 12], help="N of the kept-effect part")
    ap.add_argument("--methods", nargs="+", default=list(KEPT_METHODS), help="bench/quality.py labels")
    ap.add_argument("--prompts", type=int, default=2, help="single prompts per concept (oracle)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt (oracle)")
    ap.add_argument("--skip-oracle", action="store_true")
    ap.add_argument("--skip-kept", action="store_true")
    ap.add_argument("--swap", action="store_true", help="part 3, the swap oracle on a merged model")
    ap.add_argument("--swap-n", type=int, default=12, help="concepts merged for part 3 (first N of the manifest)")
    ap.add_argument("--swap-method", default="loraclr-conv-mean-ridge1e-1", help="bench/quality.py label, part 3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Q.ROOT / "bench" / "results" / "stages"))
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods + [args.swap_method] if m not in Q.METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(Q.METHODS)}")
    torch.set_num_threads(args.threads)
    from loraclr.evaluate import load_evaluators, load_manifest
    from loraclr.evaluate.concepts import WORLD_MANIFEST
    from loraclr.pipeline import resolve_base

    t0 = time.perf_counter()
    manifest = Path(args.manifest) if args.manifest else WORLD_MANIFEST
    specs = [s for s in load_manifest(manifest) if s.kind == "identity"]
    names = [s.name for s in specs]
    sizes = Q.Sizes(prompts=args.prompts, seeds=args.seeds, pairs=0, triples=0,
                    **({"steps": args.steps} if args.steps else {}))
    ns = sorted({min(n, len(names)) for n in args.ns})
    subsets = {n: subs[0] for n, subs in Q.draw_subsets(names, ns, 1, 1, 0).items()}
    commit, dirty = Q.git_state()
    doc = {"command": "python bench/stages.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "dirty": dirty,
           "manifest": str(manifest), "sizes": dataclasses.asdict(sizes), "subsets": subsets,
           "held_out_prompts": list(HELD_OUT)}
    with tempfile.TemporaryDirectory(prefix="stages-base-") as tmp:
        base, _ = Q.snapshot_base(resolve_base(args.base), Path(tmp) / "base")
        bench = Q.Bench(base, specs, load_evaluators(), sizes)
        if not args.skip_oracle:
            doc["oracle"] = oracle(bench, names)
        if not args.skip_kept:
            doc["kept"] = kept(bench, subsets, args.methods)
        if args.swap:
            doc["swap"] = swap(bench, names[: args.swap_n], args.swap_method)
    doc["minutes"] = (time.perf_counter() - t0) / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Q._write_json(out.with_suffix(".json"), doc)
    md = render(doc)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
