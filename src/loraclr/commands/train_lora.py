"""``loraclr train-lora``: train one concept LoRA (DreamBooth-LoRA, ED-LoRA or with textual-inversion tokens).

Data: ``--images DIR`` (images with ``<stem>.txt`` captions that use the trigger), or the built-in world's
held-out identities (``--world-identity rubo``) and styles (``--world-style mosaic``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraclr.runtime import add_runtime_arguments, apply_runtime, quiet_libraries


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images with <stem>.txt captions")
    src.add_argument("--world-identity", metavar="NAME", help="a held-out identity of the built-in world")
    src.add_argument("--world-style", metavar="STYLE", help="a held-out style of the built-in world")
    p.add_argument("-o", "--out", required=True,
                   help="output file (.safetensors; .pth for --edlora); learned tokens go beside it")
    p.add_argument("--base", default="mini", help="base model: diffusers folder, checkpoint or 'mini'")
    p.add_argument("--format", choices=["kohya", "diffusers", "edlora"], default=None,
                   help="file format (default kohya; edlora with --edlora)")
    p.add_argument("--trigger", help="trigger word (world identities: picked automatically when omitted)")
    p.add_argument("--caption", help="caption for images without a .txt file (--images)")
    p.add_argument("--prior-images", metavar="DIR", help="prior-preservation images with captions (--images)")
    p.add_argument("--prior", type=int, default=0, metavar="N",
                   help="world: N base-pool scenes for prior preservation (0 = off)")
    p.add_argument("--n-images", type=int, default=128, help="world: number of training renders")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--edlora", action="store_true",
                     help="ED-LoRA: learned layer-wise tokens (--token, default two: <NAME1> <NAME2>)")
    tok.add_argument("--learned-token", action="store_true",
                     help="also learn textual-inversion token(s) (--token), saved beside the LoRA")
    p.add_argument("--token", action="append", default=[], metavar="NAME",
                   help="learned token name(s) (repeatable); captions must use them")
    p.add_argument("--init-word", default="creature", help="learned tokens start from this word's embedding")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    p.add_argument("--targets", choices=["attn", "kohya"], default="attn",
                   help="attn: q/k/v/out of attention layers; kohya: also ff, proj_in/out, text MLP")
    p.add_argument("--no-text-encoder", action="store_true", help="train the UNet only")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prior-batch", type=int, default=4)
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3, help="UNet LoRA learning rate")
    p.add_argument("--text-lr", type=float, default=5e-4, help="text-encoder LoRA learning rate")
    p.add_argument("--embedding-lr", type=float, default=5e-3, help="learned-token learning rate")
    p.add_argument("--token-warmup", type=int, default=0,
                   help="the first N of --steps train only the learned tokens (--edlora / --learned-token), then "
                        "the LoRA joins: identity goes into the tokens first (pivotal tuning)")
    p.add_argument("--snapshots", type=int, nargs="+", default=[], metavar="K",
                   help="also save the LoRA after K of --steps (above --token-warmup) as STEM-sK beside --out: "
                        "what a K-step run would write, from one run (the learning rate is constant after warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the LoRA trains: cpu (default), cuda, cuda:1 ... (data and files stay on the CPU)")
    add_runtime_arguments(p, precision_help="of the model forward on --device (default: auto)")
    # the flag of earlier versions, kept so that scripts using it still run
    p.add_argument("--no-autocast", dest="precision", action="store_const", const="fp32", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bar, no notices from the model libraries")


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from loraclr.pipeline import family_of, load_base
    from loraclr.training import TrainConfig, check_save_path, save_trained, snapshot_path, train_lora
    from loraclr.training import data as D

    quiet = getattr(args, "quiet", False)
    quiet_libraries(notices=quiet)
    runtime = apply_runtime(args)
    out = Path(args.out)
    fmt = args.format or ("edlora" if args.edlora else "kohya")
    if fmt == "edlora" and not args.edlora:
        raise ValueError("--format edlora needs --edlora (ED-LoRA files carry layer-wise tokens)")
    check_save_path(out, fmt)  # before training: a bad output path must not cost the run
    pipe = load_base(args.base)
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    name = args.world_identity or args.world_style or out.stem
    tokens = tuple(args.token)
    if args.edlora and not tokens:
        stem = D.pick_trigger(pipe.tokenizer, name, set())
        tokens = (f"<{stem}1>", f"<{stem}2>")
    if args.learned_token and not tokens:
        raise ValueError("--learned-token needs --token NAME (and captions that use it)")
    if args.world_identity:
        if tokens:
            trigger = " ".join(tokens)
        else:
            trigger = args.trigger or D.pick_trigger(pipe.tokenizer, name, D.caption_vocabulary_ids(pipe.tokenizer))
        data = D.world_identity_data(name, f"a {trigger} creature", n=args.n_images, seed=args.seed,
                                     n_prior=args.prior)
    elif args.world_style:
        trigger = D.style_trigger(args.world_style)
        data = D.world_style_data(args.world_style, n=args.n_images, seed=args.seed, n_prior=args.prior)
        if tokens:  # the learned tokens stand in for the style words
            data.captions = [c.replace(trigger, " ".join(tokens)) for c in data.captions]
            trigger = " ".join(tokens)
    else:
        data = D.folder_data(args.images, side, default_caption=args.caption, prior_folder=args.prior_images)
        trigger = args.trigger or (" ".join(tokens) if tokens else None)
    if data.images.shape[1] != side:  # world renders are 64 px; another base model may draw at another size
        data.images = D.resize_images(data.images, side)
        if data.prior_images is not None:
            data.prior_images = D.resize_images(data.prior_images, side)
    cfg = TrainConfig(
        rank=args.rank, alpha=float(args.alpha if args.alpha is not None else args.rank), targets=args.targets,
        train_text_encoder=not args.no_text_encoder, steps=args.steps, batch=args.batch,
        prior_batch=args.prior_batch, prior_weight=args.prior_weight, lr=args.lr, text_lr=args.text_lr,
        embedding_lr=args.embedding_lr, tokens=tokens, layerwise=args.edlora, init_word=args.init_word,
        seed=args.seed, autocast=runtime["precision"] == torch.bfloat16, token_warmup=args.token_warmup,
    )
    snapshots = []

    def snapshot(r) -> None:
        path = snapshot_path(out, r.config.steps)
        snapshots.append(str(save_trained(r, path, format=fmt, family=family_of(pipe), trigger=trigger)))

    # the bar shows steps/s and the time left from the first step; the trainer's own log lines would break it up
    with tqdm(total=cfg.steps, desc=f"train {out.name}", unit="step", disable=quiet) as bar:
        def advance(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        result = train_lora(pipe, data, cfg, device=args.device, snapshots=args.snapshots, on_snapshot=snapshot,
                            callback=advance, log_every=0)
    save_trained(result, out, format=fmt, family=family_of(pipe), trigger=trigger)
    summary = {"file": str(out), "format": fmt, "trigger": trigger, "tokens": list(tokens), "rank": cfg.rank,
               "alpha": cfg.alpha, "steps": cfg.steps, "seed": cfg.seed, "layers": len(result.layers),
               "loss_first_50": sum(result.losses[:50]) / len(result.losses[:50]),
               "loss_last_50": sum(result.losses[-50:]) / len(result.losses[-50:]),
               "seconds": round(result.seconds, 1), "example_caption": data.captions[0],
               **({"snapshots": snapshots} if snapshots else {})}
    print(json.dumps(summary, indent=2))
    return 0
