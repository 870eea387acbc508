"""Train the miniature world's layout adapter: a small diffusers T2IAdapter that reads
``loraclr.structure.layout_image`` (one box per character) and lays the characters out in their boxes.

    python scripts/train_layout_adapter.py --probe 20          # time 20 steps, train nothing
    python scripts/train_layout_adapter.py --minutes 30        # train -> src/loraclr/world/assets/layout-adapter
    python scripts/train_layout_adapter.py --check             # base vs base + adapter on region boxes

The mini base (VAE, text encoder, UNet) stays frozen; only the adapter trains, with the base's epsilon loss
on the world's scenes of 1-3 characters. Each character's box is enlarged by a random margin up to its slot's
share of the image, so that a box means "one character somewhere in here", as a user's loose region box does.
Captions are the full scene caption, one character's own caption (what a region prompt says) or empty (the
unconditional half of guidance also sees the layout). Runs, logs and check images go to runs/layout-adapter/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loraclr.structure import LAYOUT_DIR, Structure, layout_image, structure_kwargs, structure_pipeline
from loraclr.world import scenes as S
from loraclr.world.model import base_model_path, load_base_pipeline, make_scheduler
from loraclr.world.tokenizer import load_tokenizer
from loraclr.world.training import grid, images_to_tensor, load_vae, save_png, tokenize

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "layout-adapter"
log = logging.getLogger("train_layout_adapter")

ONE_CHAR_KEEP = 0.5  # keeps half of sample_base_scene's 1-character scenes: 25 / 50 / 25 % for 1 / 2 / 3
CAPTION_P = (0.5, 0.3, 0.2)  # full caption, one character's caption, empty
# slot -> its share of the image's width, by number of characters (the room a loose box may take)
_SLOT_SPAN = {1: {s: (0.0, 1.0) for s in S.SLOTS}, 2: {"left": (0.0, 0.5), "right": (0.5, 1.0)},
              3: {"left": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "right": (2 / 3, 1.0)}}
CHECK_BOXES = [(0.0, 0.25, 0.5, 1.0), (0.5, 0.25, 1.0, 1.0)]  # left / right half below the top quarter


# --- data ---------------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator) -> S.Scene:
    """A base-training scene with more multi-character layouts than the base saw."""
    while True:
        scene = S.sample_base_scene(rng)
        if len(scene.characters) > 1 or rng.random() < ONE_CHAR_KEEP:
            return scene


def loose_box(box: tuple[int, int, int, int], n: int, slot: str, rng: np.random.Generator,
              side: int = S.SIZE) -> tuple[float, float, float, float]:
    """A character's tight pixel box grown on each side by a uniform share of the room up to its slot's span
    (full height): fractions (x0, y0, x1, y1)."""
    lo, hi = _SLOT_SPAN[n][slot]
    x0, y0, x1, y1 = (v / side for v in box)
    u = rng.random(4)
    return (x0 - u[0] * max(0.0, x0 - lo), y0 - u[1] * y0, x1 + u[2] * max(0.0, hi - x1), y1 + u[3] * (1 - y1))


def condition_tensor(boxes, side: int = S.SIZE) -> torch.Tensor:
    """(3, side, side) in [0, 1], exactly as StableDiffusionAdapterPipeline reads a PIL condition."""
    return torch.from_numpy(np.asarray(layout_image(boxes, side, side), dtype=np.float32) / 255.0).permute(2, 0, 1)


def one_character_caption(scene: S.Scene, index: int) -> str:
    """The caption of the scene's ``index``-th character (left to right) drawn alone: a region's prompt."""
    c = scene.ordered()[index]
    return S.caption_scene(S.Scene((S.Character(c.identity, "middle"),), scene.background, scene.style))[0]


def build_pool(n: int, seed: int, vae) -> dict:
    """``n`` seeded scenes: latents (n, 4, h, w) scaled as the UNet sees them, and the renders."""
    rng = np.random.default_rng([seed, 24])
    rendered = [S.render(sample_scene(rng), seed=int(rng.integers(2**31))) for _ in range(n)]
    latents = []
    with torch.no_grad():
        for i in range(0, n, 256):
            x = images_to_tensor(np.stack([r.image for r in rendered[i:i + 256]]))
            latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return {"latents": torch.cat(latents), "rendered": rendered}


def make_batch(pool: dict, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Latents (B, 4, h, w), captions, conditions (B, 3, 64, 64) for one step."""
    idx = rng.integers(0, len(pool["rendered"]), batch)
    captions, conds = [], []
    for i in idx:
        r = pool["rendered"][i]
        chars = r.scene.ordered()
        n = len(chars)
        conds.append(condition_tensor([loose_box(b, n, c.slot, rng) for b, c in zip(r.boxes, chars, strict=True)]))
        kind = rng.choice(3, p=CAPTION_P)
        captions.append(r.caption if kind == 0 else one_character_caption(r.scene, int(rng.integers(n)))
                        if kind == 1 else "")
    return pool["latents"][torch.from_numpy(idx)], captions, torch.stack(conds)


# --- model --------------------------------------------------------------------------------------------------


def build_adapter(unet, vae_scale: int, num_res_blocks: int, seed: int):
    """A light T2IAdapter shaped to the UNet: one feature per down block, at that block's width and size.

    Each block's output conv starts at zero (as ControlNet's zero convolutions), so training starts from
    the base model unchanged.
    """
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels), num_res_blocks=num_res_blocks,
                         downscale_factor=vae_scale, adapter_type="light_adapter")
    with torch.no_grad():
        for block in adapter.adapter.body:
            block.out_conv.weight.zero_()
            block.out_conv.bias.zero_()
    return adapter


def save_adapter(adapter, out: Path, report: dict) -> None:
    """fp16 diffusers folder (config.json + diffusion_pytorch_model.safetensors), swapped into ``out`` whole."""
    import copy

    half = copy.deepcopy(adapter).to(torch.float16)
    bad = [k for k, p in half.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{out}: non-finite adapter weights ({bad[0]} ...); not saving")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    half.save_pretrained(str(tmp), safe_serialization=True)
    # a resumed adapter remembers the folder it was loaded from: no machine's path in the shipped config
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("_name_or_path", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (out / "README.md").exists():
        shutil.copy2(out / "README.md", tmp / "README.md")
    (tmp / "training.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train(args) -> dict:
    base = base_model_path()
    pipe = load_base_pipeline()
    vae = load_vae(base / "vae")
    te, unet = pipe.text_encoder.requires_grad_(False).eval(), pipe.unet.requires_grad_(False).eval()
    tok = load_tokenizer()
    t0 = time.time()
    pool = build_pool(args.scenes, args.seed, vae)
    log.info("pool: %d scenes rendered and encoded in %.0fs", args.scenes, time.time() - t0)
    previous = None
    if args.resume:  # the shipped fp16 weights in fp32, a fresh optimizer and schedule
        from loraclr.structure import load_structure

        adapter = load_structure(args.out).model.float().requires_grad_(True).train()
        previous = json.loads((Path(args.out) / "training.json").read_text(encoding="utf-8"))
    else:
        adapter = build_adapter(unet, pipe.vae_scale_factor, args.res_blocks, args.seed).train()
    n_params = sum(p.numel() for p in adapter.parameters())
    log.info("adapter: %d parameters (%.0f KB in fp16)", n_params, n_params * 2 / 1024)
    opt = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=0.0)
    acp = make_scheduler("ddpm").alphas_cumprod  # (T,)
    T = acp.shape[0]
    run = 0 if previous is None else len(previous.get("earlier", [])) + 1  # fresh draws for a resumed run
    rng = np.random.default_rng([args.seed, 25, run])
    g = torch.Generator().manual_seed(args.seed * 1000 + run)
    steps = args.probe or args.steps
    losses, t_start, step = [], time.time(), 0
    while step < steps and (args.probe or time.time() - t_start < args.minutes * 60):
        for group in opt.param_groups:  # warm-up, then cosine to a tenth
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        x0, captions, cond = make_batch(pool, rng, args.batch)
        with torch.no_grad():
            states = te(tokenize(tok, captions))[0]  # (B, 77, D)
        noise = torch.randn(x0.shape, generator=g)
        # T2I-Adapter's non-uniform sampling (Mou et al. 2023, sec. 3.4): t = (1 - u^3) T favours the noisy
        # early steps, where the layout is decided
        u = torch.rand(x0.shape[0], generator=g)
        t = ((1 - u**3) * T).long().clamp(0, T - 1)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            feats = adapter(cond)
            pred = unet(xt, t, states, down_intrablock_additional_residuals=list(feats)).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0 or step == steps:
            log.info("step %d/%d loss %.4f (last 25) %.2f s/step", step, steps, float(np.mean(losses[-25:])),
                     (time.time() - t_start) / step)
    seconds = time.time() - t_start
    report = {"steps": step, "planned_steps": steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
              "scenes": args.scenes, "res_blocks": args.res_blocks, "bf16_autocast": args.bf16,
              "parameters": n_params, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "loss_first_100": float(np.mean(losses[:100])), "loss_last_100": float(np.mean(losses[-100:])),
              "captions": dict(zip(("full", "one character", "empty"), CAPTION_P, strict=True)),
              "timesteps": "t = (1 - u^3) T, u uniform", "base": str(base.relative_to(ROOT))}
    if previous is not None:
        report["earlier"] = [*previous.pop("earlier", []), previous]
    if args.probe:
        log.info("probe: %.3f s/step at batch %d; nothing saved", seconds / step, args.batch)
        return report
    save_adapter(adapter.eval(), Path(args.out), report)
    log.info("saved %s after %d steps in %.1f min", args.out, step, seconds / 60)
    return report


# --- check --------------------------------------------------------------------------------------------------


def presence_detector(ident, vae, n: int, seed: int):
    """A linear probe on the world's identity embeddings of a half-image crop: is a whole character in it?

    Trained on renders seen through the VAE (as generated images are): positives are both halves of
    two-character scenes, negatives the empty half of one-character scenes whose character stays in the
    other half and both halves of one character in the middle. Returns (predict: embeddings -> bool, accuracy on held-out renders).
    """
    from loraclr.world.evaluator_training import camera_roundtrip

    rng = np.random.default_rng([seed, 27])
    images, boxes, labels = [], [], []
    while labels.count(1) < n:
        pair = tuple(S.Character(S.sample_base_identity(rng), slot) for slot in ("left", "right"))
        r = S.render(S.Scene(pair, S.BACKGROUNDS[rng.integers(len(S.BACKGROUNDS))]), int(rng.integers(2**31)))
        images += [r.image, r.image]
        boxes += CHECK_BOXES
        labels += [1, 1]
    while labels.count(0) < n:
        slot = ("left", "right", "middle")[rng.integers(3)]
        scene = S.Scene((S.Character(S.sample_base_identity(rng), slot),), S.BACKGROUNDS[rng.integers(6)])
        r = S.render(scene, int(rng.integers(2**31)))
        x0, _, x1, _ = r.boxes[0]
        if slot == "middle":  # a character cut in two by the middle line is in neither half
            images += [r.image, r.image]
            boxes += CHECK_BOXES
            labels += [0, 0]
        elif (slot == "left" and x1 <= S.SIZE // 2) or (slot == "right" and x0 >= S.SIZE // 2):
            images.append(r.image)
            boxes.append(CHECK_BOXES[1] if slot == "left" else CHECK_BOXES[0])
            labels.append(0)
    seen = camera_roundtrip(torch.from_numpy(np.stack(images)), vae)
    x = torch.from_numpy(seen.numpy()).permute(0, 3, 1, 2).float() / 255
    emb = F.normalize(ident.embed_regions(x, torch.tensor(boxes)), dim=-1)  # (N, D)
    y = torch.tensor(labels, dtype=torch.float32)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[: len(y) * 7 // 10], perm[len(y) * 7 // 10:]
    w = torch.zeros(emb.shape[1] + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(500):
        logits = emb[train_idx] @ w[:-1] + w[-1]
        loss = F.binary_cross_entropy_with_logits(logits, y[train_idx]) + 1e-3 * w[:-1].square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = w.detach()

    def predict(e: torch.Tensor) -> torch.Tensor:
        return (F.normalize(e, dim=-1) @ w[:-1] + w[-1]) > 0

    accuracy = float((predict(emb[test_idx]) == y[test_idx].bool()).float().mean())
    return predict, accuracy


def check(args) -> dict:
    """Two characters asked for in the left / right halves below the top quarter, with and without the
    adapter. Per half: is a character there (a probe on the world's identity embeddings, see
    :func:`presence_detector`), and is it the one asked for (the identity evaluator's calibrated threshold)."""
    from loraclr.evaluate import load_evaluators
    from loraclr.evaluate.world import identity_references
    from loraclr.surgery.tokens import encode

    pipe = load_base_pipeline()
    structure = Structure("t2i-adapter", _load(args.out), args.scale, str(args.out))
    runner = structure_pipeline(pipe, structure)
    cond = layout_image(CHECK_BOXES, 64, 64)
    ev = load_evaluators()
    ident, threshold = ev.identity, ev.identity.threshold
    present, probe_accuracy = presence_detector(ident, pipe.vae, 300, args.seed)
    log.info("presence probe: %.3f accuracy on held-out renders", probe_accuracy)
    rng = np.random.default_rng([args.seed, 26])
    out_dir = RUNS / "check"
    rows: dict[str, list] = {"base": [], "adapter": []}
    samples: dict[tuple[str, str], list] = {}
    for k in range(args.pairs):
        a, b = S.sample_base_identity(rng), S.sample_base_identity(rng)
        scene = S.Scene((S.Character(a, "left"), S.Character(b, "right")), S.BACKGROUNDS[k % len(S.BACKGROUNDS)])
        # "pair": the scene's caption; "one": only the left character's caption, as a region prompt says it
        prompts = {"pair": S.caption_scene(scene)[0], "one": one_character_caption(scene, 0)}
        refs = identity_references(ident, [a, b])  # (2, D)
        for kind, text in prompts.items():
            states, _ = encode(pipe, [text], pad=True)
            for name, p in (("base", pipe), ("adapter", runner)):
                extra = structure_kwargs(structure, cond, 64, 64) if name == "adapter" else {}
                gen = torch.Generator().manual_seed(args.seed + k)
                img = p(prompt_embeds=states, negative_prompt="", guidance_scale=7.5, num_inference_steps=25,
                        height=64, width=64, generator=gen, output_type="np", **extra).images[0]
                x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
                emb = ident.embed_regions(x.repeat(2, 1, 1, 1), torch.tensor(CHECK_BOXES))  # (2, D): left, right
                d = 1 - F.normalize(emb, dim=-1) @ F.normalize(refs, dim=-1).T  # (half, identity)
                rows[name].append({"kind": kind, "d": d.tolist(), "present": present(emb).tolist()})
                samples.setdefault((kind, name), []).append((img * 255 + 0.5).astype(np.uint8))
    result = {"pairs": args.pairs, "identity_threshold": threshold, "presence_probe_accuracy": probe_accuracy,
              "boxes": CHECK_BOXES, "scale": args.scale, "steps": 25, "guidance": 7.5}
    for name, rs in rows.items():
        res = {}
        for kind in ("pair", "one"):
            sel = [r for r in rs if r["kind"] == kind]
            d = torch.tensor([r["d"] for r in sel])  # (N, half, identity)
            pres = torch.tensor([r["present"] for r in sel])  # (N, half)
            # pair: a wanted in the left half, b in the right one; one: a wanted in both
            want = d[:, 0, 0], d[:, 1, 1] if kind == "pair" else d[:, 1, 0]
            ok = [w < threshold for w in want]
            res[kind] = {"character_in_left": float(pres[:, 0].float().mean()),
                         "character_in_right": float(pres[:, 1].float().mean()),
                         "characters_in_both_halves": float(pres.all(1).float().mean()),
                         "mean_characters_found": float(pres.float().sum(1).mean()),
                         "identity_recognised_left": float(ok[0].float().mean()),
                         "identity_recognised_right": float(ok[1].float().mean()),
                         "identity_distance_left": float(want[0].mean()),
                         "identity_distance_right": float(want[1].mean())}
            if kind == "pair":  # each half nearer to the identity asked for there than to the other one
                res[kind]["right_order"] = float(((d[:, 0, 0] < d[:, 0, 1]) & (d[:, 1, 1] < d[:, 1, 0])).float().mean())
        result[name] = res
    out_dir.mkdir(parents=True, exist_ok=True)
    for (kind, name), imgs in samples.items():
        save_png(grid(np.stack(imgs[:24]), 8), out_dir / f"{kind}-{name}.png", scale=3)
    (out_dir / "check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info("check: %s", json.dumps(result, indent=2))
    return result


def _load(folder):
    from loraclr.structure import load_structure

    return load_structure(folder).model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(LAYOUT_DIR), help="adapter folder to write (train) or read (check)")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the training loop")
    p.add_argument("--steps", type=int, default=3000, help="length of the LR schedule")
    p.add_argument("--probe", type=int, default=0, help="time this many steps and save nothing")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--res-blocks", type=int, default=2, help="residual blocks per adapter level")
    p.add_argument("--scenes", type=int, default=6000, help="rendered and encoded once, reused every epoch")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    p.add_argument("--resume", action="store_true",
                   help="continue from the adapter in --out (fp16 -> fp32) with a fresh optimizer and schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    p.add_argument("--check", action="store_true", help="measure base vs base + adapter and exit")
    p.add_argument("--pairs", type=int, default=48, help="check: character pairs (two prompts each)")
    p.add_argument("--scale", type=float, default=1.0, help="check: adapter_conditioning_scale")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(RUNS / ("check.log" if args.check
                                                                                  else "train.log"))])
    if args.check:
        check(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
