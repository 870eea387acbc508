"""Training the miniature world's base model from scratch: VAE, then text encoder + UNet.

Stages (each reproducible from its seed; ``scripts/train_world.py`` runs them):
1. ``train_vae``: the autoencoder on freshly rendered scenes (L1 + MSE + a small KL), then its latent
   ``scaling_factor`` (1 / std of the latents, as SD's 0.18215) is measured and stored in its config.
2. ``build_dataset``: a fixed, seeded set of base-training scenes (held-out identities and styles never
   appear), encoded once to latents (posterior means) and tokenised; cached under ``runs/``.
3. ``train_base``: text encoder (from scratch) and UNet jointly, epsilon prediction with SD 1.5's noise
   schedule, caption dropout for classifier-free guidance, bf16 autocast, EMA weights. Runs for a wall-clock
   budget, saving the pipeline folder atomically every few minutes with ``training_state.json`` beside it
   and a sample grid under ``runs/``.

Resuming: the pipeline folder (fp16, committed) + ``training_state.json`` is the checkpoint that travels
between machines. Resuming reloads the fp16 (EMA) weights in fp32 as both the trained and the EMA weights and
restarts AdamW with a short linear warm-up (its moments are not shipped); the learning-rate schedule
continues from the saved step. On the same machine a full fp32 checkpoint with the optimizer
(``runs/world/base-last.pt``) is used instead when its step matches.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loraclr.world import scenes as S
from loraclr.world.model import (
    assemble_pipeline,
    build_text_and_unet,
    build_vae,
    make_scheduler,
    read_training_state,
    save_pipeline_folder,
)

log = logging.getLogger(__name__)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, 64, 64, 3) uint8 -> (n, 3, 64, 64) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, cols: int) -> np.ndarray:
    """(n, H, W, 3) -> one (rows*H, cols*W, 3) image (missing cells black)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    return out


def save_png(array: np.ndarray, path: str | Path, scale: int = 2) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def _vae_scene(rng: np.random.Generator) -> S.Scene:
    # The autoencoder sees every style, held-out ones included (like SD's VAE, it is a general image codec);
    # identities come from the base pool only.
    scene = S.sample_base_scene(rng, styled=0.0)
    if rng.random() < 0.3:
        scene = S.Scene(scene.characters, scene.background, S.STYLES[1 + rng.integers(len(S.STYLES) - 1)])
    return scene


def _vae_batch(rng: np.random.Generator, batch: int) -> np.ndarray:
    out = []
    for _ in range(batch):
        scene = _vae_scene(rng)
        out.append(S.render(scene, seed=int(rng.integers(2**31))).image)
    return np.stack(out)


RENDER_CHUNK = 1000  # scenes per seeded chunk: the pools below are the same whatever the number of workers


def _render_chunk(job: tuple[str, int, int, int]) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """One seeded chunk of a scene pool: images, captions and (base pool) CLIP token ids."""
    kind, seed, chunk, count = job
    rng = np.random.default_rng([seed, 6 if kind == "vae" else 7, chunk])
    images = np.empty((count, S.SIZE, S.SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        scene = _vae_scene(rng) if kind == "vae" else S.sample_base_scene(rng)
        r = S.render(scene, seed=int(rng.integers(2**31)))
        images[i] = r.image
        captions.append(r.caption)
    ids = None
    if kind == "base":
        from loraclr.world.tokenizer import load_tokenizer

        ids = tokenize(load_tokenizer(), captions).to(torch.int32).numpy()
    return images, captions, ids


def pool_jobs(kind: str, n: int, seed: int = 0) -> list[tuple[str, int, int, int]]:
    """The seeded chunks of a pool of ``n`` scenes, for :func:`_render_chunk` (in any process, any order)."""
    if kind not in ("vae", "base"):
        raise ValueError(f"unknown pool kind {kind!r}; use 'vae' or 'base'")
    return [(kind, seed, c, min(RENDER_CHUNK, n - c * RENDER_CHUNK)) for c in range(math.ceil(n / RENDER_CHUNK))]


def join_chunks(parts: list) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """The rendered chunks of :func:`pool_jobs`, in order, as one pool (images, captions, token ids)."""
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    ids = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
    return images, captions, ids


def render_pool(kind: str, n: int, seed: int = 0, workers: int = 1) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """``n`` seeded scenes for the VAE (``kind="vae"``: every style) or the base (``"base"``: base pool only,
    with token ids), rendered in chunks of :data:`RENDER_CHUNK` by ``workers`` processes (same result for any
    number of workers)."""
    jobs = pool_jobs(kind, n, seed)
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs, chunksize=1)
    else:
        parts = [_render_chunk(j) for j in jobs]
    log.info("rendered %d %s scenes with %d worker(s) in %.0fs", n, kind, workers, time.time() - t0)
    return join_chunks(parts)


# --- 1. VAE --------------------------------------------------------------------------------------------------


def train_vae(out_dir: str | Path, steps: int = 700, batch: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0, size: str = "mini", autocast: bool = True, log_every: int = 25,
              device: str = "cpu", pool: np.ndarray | None = None):
    """Train the world's AutoencoderKL; saves it (fp32) to ``out_dir`` with its scaling factor set.

    Batches are rendered fresh at every step, or drawn from ``pool`` (uint8 images from
    :func:`render_pool`, ``"vae"`` kind) when given: on a GPU rendering would be the bottleneck.
    """
    out_dir = Path(out_dir)
    dev = torch.device(device)
    rng = np.random.default_rng([seed, 1])
    vae = build_vae(size, seed).to(dev)

    def batch_of(k: int) -> torch.Tensor:
        if pool is None:
            return images_to_tensor(_vae_batch(rng, k)).to(dev)
        return images_to_tensor(pool[np.sort(rng.integers(0, len(pool), k))]).to(dev)

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warm = min(50, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    t0 = time.time()
    for step in range(steps):
        x = batch_of(batch)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample
        rec = rec.float()
        loss_rec = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = loss_rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f rec %.4f kl/elem %.3f lr %.2e %.1fs", step, steps, loss.item(),
                     loss_rec.item(), kl.item(), sched.get_last_lr()[0], time.time() - t0)
    vae.eval()
    # scaling factor: latents times it have unit std (SD: 0.18215), measured on fresh scenes
    with torch.no_grad():
        zs = torch.cat([vae.encode(images_to_tensor(_vae_batch(rng, 64)).to(dev)).latent_dist.mean
                        for _ in range(8)])
        x = images_to_tensor(_vae_batch(rng, 16)).to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    scaling = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=scaling)
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), x)))
    log.info("vae done: scaling_factor %.4f, latent mean %.3f, reconstruction PSNR %.2f dB", scaling,
             float(zs.mean()), psnr)
    vae = vae.to("cpu")
    vae.save_pretrained(str(out_dir))
    pair = np.concatenate([tensor_to_images(x.cpu()), tensor_to_images(rec.cpu())])
    save_png(grid(pair, 16), out_dir / "reconstructions.png", scale=3)
    (out_dir / "vae_report.json").write_text(json.dumps(
        {"steps": steps, "batch": batch, "seed": seed, "psnr_db": psnr, "scaling_factor": scaling,
         "pool": None if pool is None else len(pool), "device": dev.type, "seconds": time.time() - t0},
        indent=2), encoding="utf-8")
    return vae


def finetune_decoder(vae_dir: str | Path, steps: int = 1500, batch: int = 32, lr: float = 5e-4, seed: int = 0,
                     latent_noise: float = 0.1, save_every: int = 100, autocast: bool = True, log_every: int = 25):
    """Train only the VAE's decoder (the encoder, hence the latent space, stays frozen), saving into ``vae_dir``.

    The base UNet trains on the frozen encoder's latents, so this can run at the same time as ``train_base``,
    which picks up the newer decoder at its next checkpoint. The decoder sees the posterior mean plus a little
    Gaussian noise (``latent_noise`` x the latent std) so that it tolerates the UNet's imperfect latents.
    """
    vae_dir = Path(vae_dir)
    vae = load_vae(vae_dir)
    vae.decoder.requires_grad_(True).train()
    vae.post_quant_conv.requires_grad_(True).train()
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 4])
    std = 1.0 / vae.config.scaling_factor
    t0 = time.time()
    losses: list[float] = []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = images_to_tensor(_vae_batch(rng, batch))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = vae.encode(x).latent_dist.mean.float()
        z = z + latent_noise * std * torch.randn_like(z)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            rec = vae.decode(z).sample
        rec = rec.float()
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0:
            log.info("decoder step %d/%d loss %.4f %.1fs", step, steps, float(np.mean(losses[-log_every:])),
                     time.time() - t0)
        if step % save_every == 0 or step == steps:
            vae.eval()
            with torch.no_grad():
                x = images_to_tensor(_vae_batch(np.random.default_rng([seed, 5]), 16))
                rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), x)))
            tmp = vae_dir.parent / f".{vae_dir.name}.tmp"
            vae.save_pretrained(str(tmp))
            pair = np.concatenate([tensor_to_images(x), tensor_to_images(rec)])
            save_png(grid(pair, 16), tmp / "reconstructions.png", scale=3)
            report_path = vae_dir / "vae_report.json"
            report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
            report["decoder_finetune"] = {"steps": step, "psnr_db": psnr, "latent_noise": latent_noise,
                                          "seconds": time.time() - t0}
            (tmp / "vae_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            old = vae_dir.parent / f".{vae_dir.name}.old"
            vae_dir.rename(old)
            tmp.rename(vae_dir)
            import shutil

            shutil.rmtree(old)
            log.info("decoder step %d: held-out reconstruction PSNR %.2f dB, saved to %s", step, psnr, vae_dir)
            vae.decoder.train()
    return vae


# --- 2. dataset ------------------------------------------------------------------------------------------------


def load_vae(path: str | Path):
    """An AutoencoderKL in fp32 with its weights rounded through fp16, as the shipped folder holds them.

    Encoding with the rounded weights makes the cached latents the same whether the VAE comes from
    ``runs/world/vae`` (this machine) or from the committed pipeline folder (a fresh machine).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(p.half().float())
    return vae.eval().requires_grad_(False)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Exactly as ``StableDiffusionPipeline.encode_prompt`` does: padded to max length, truncated."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def render_scenes(n: int, seed: int = 0, cache: str | Path | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` seeded base-training scenes: images (n, 64, 64, 3) uint8 and captions (cached as .npz)."""
    if cache is not None and Path(cache).exists():
        z = np.load(cache, allow_pickle=False)
        return z["images"], [str(c) for c in z["captions"]]
    rng = np.random.default_rng([seed, 2])
    images = np.empty((n, S.SIZE, S.SIZE, 3), dtype=np.uint8)
    captions = []
    t0 = time.time()
    for i in range(n):
        r = S.render(S.sample_base_scene(rng), seed=int(rng.integers(2**31)))
        images[i] = r.image
        captions.append(r.caption)
        if i % 5000 == 0:
            log.info("rendered %d/%d scenes, %.0fs", i, n, time.time() - t0)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache).with_suffix(".tmp.npz")
        np.savez(tmp, images=images, captions=np.array(captions))
        tmp.rename(cache)
    return images, captions


def build_dataset(vae, out_path: str | Path, n: int = 30000, seed: int = 0, chunk: int = 256, workers: int = 0,
                  device: str = "cpu", rendered: tuple | None = None) -> dict:
    """Render ``n`` base-training scenes, encode them (posterior mean x scaling factor) and tokenise.

    Cached at ``out_path``: {latents (n, 4, 16, 16) fp16, input_ids (n, 77) int32, captions, seed, n}.
    ``workers`` > 0 renders the pool in seeded chunks (:func:`render_pool`, the same for any number of
    workers; the images are not cached, only the latents); ``workers=0`` (the default, as in
    :func:`train_base`) keeps the older sequential definition, its images cached as ``scenes-<seed>-<n>.npz``.
    ``device`` runs the encoder. ``rendered`` is the chunked pool rendered already (``join_chunks(...)`` of
    ``pool_jobs("base", n, seed)``).
    """
    from loraclr.world.tokenizer import load_tokenizer

    out_path = Path(out_path)
    if out_path.exists():
        log.info("dataset cached at %s", out_path)
        return torch.load(out_path, weights_only=False)
    if isinstance(vae, (str, Path)):
        vae = load_vae(vae)
    dev = torch.device(device)
    vae = vae.to(dev)
    tok = load_tokenizer()
    if rendered is not None or workers > 0:
        images, captions, ids = rendered if rendered is not None else render_pool("base", n, seed, workers)
        if len(images) != n:
            raise ValueError(f"build_dataset: {len(images)} pre-rendered scenes given for n={n}")
        input_ids = torch.from_numpy(ids)
    else:
        images, captions = render_scenes(n, seed, out_path.parent / f"scenes-{seed}-{n}.npz")
        input_ids = tokenize(tok, captions).to(torch.int32)
    latents = []
    t0 = time.time()
    scale = vae.config.scaling_factor
    for start in range(0, n, chunk):
        with torch.no_grad():
            z = vae.encode(images_to_tensor(images[start : start + chunk]).to(dev)).latent_dist.mean * scale
        latents.append(z.half().cpu())
        if (start // chunk) % 200 == 0:
            log.info("encoded %d/%d scenes, %.0fs", start + z.shape[0], n, time.time() - t0)
    lengths = (input_ids == tok.eos_token_id).int().argmax(1) + 1  # tokens up to the first end-of-text
    n_full = int((lengths >= tok.model_max_length).sum())
    if n_full:
        log.warning("%d of %d captions fill all %d tokens and may be truncated", n_full, n, tok.model_max_length)
    data = {"latents": torch.cat(latents), "input_ids": input_ids,
            "captions": captions, "seed": seed, "n": n, "max_tokens": int(lengths.max()),
            "pool": "chunks" if (rendered is not None or workers > 0) else "sequential"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out_path.with_suffix(".tmp"))
    out_path.with_suffix(".tmp").rename(out_path)
    log.info("dataset done: %d scenes, latent std %.3f, longest caption %d tokens, %.0fs", n,
             float(data["latents"].float().std()), data["max_tokens"], time.time() - t0)
    return data


# --- 3. text encoder + UNet ---------------------------------------------------------------------------------------

# The scenes whose captions make the progress grids (ground-truth render first, then samples).
_C = S.Character
SAMPLE_SCENES = [
    S.Scene((_C(S.Identity("round", "red"), "middle"),), "beach"),
    S.Scene((_C(S.Identity("tall", "blue", "spots", "white", "glasses", "a hat"), "middle"),), "snow"),
    S.Scene((_C(S.Identity("square", "yellow", face="one eye"), "middle"),), "room"),
    S.Scene((_C(S.Identity("pointy", "green", face="three eyes", accessory="a crown"), "middle"),), "forest"),
    S.Scene((_C(S.Identity("round", "red"), "left"), _C(S.Identity("tall", "blue", face="one eye"), "right")),
            "city"),
    S.Scene((_C(S.Identity("square", "green", "stripes", "yellow", accessory="a bow"), "left"),
             _C(S.Identity("pointy", "purple", face="glasses"), "right")), "night"),
    S.Scene((_C(S.Identity("round", "orange"), "left"), _C(S.Identity("square", "white"), "middle"),
             _C(S.Identity("tall", "pink", face="one eye"), "right")), "beach"),
    S.Scene((_C(S.Identity("tall", "yellow", "checks", "black"), "middle"),), "city", "pastel"),
]


def sample_grid(pipe, scenes: list[S.Scene] = SAMPLE_SCENES, per_prompt: int = 3, steps: int = 25,
                guidance: float = 5.0, seed: int = 0) -> np.ndarray:
    """Rows: one scene each, its ground-truth render then ``per_prompt`` samples from ``pipe``."""
    rows = []
    for i, scene in enumerate(scenes):
        truth = S.render(scene, seed=i)
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(truth.caption, num_images_per_prompt=per_prompt, num_inference_steps=steps,
                   guidance_scale=guidance, generator=g, output_type="np").images
        rows.append(np.concatenate([truth.image[None], (out * 255 + 0.5).astype(np.uint8)]))
    return grid(np.concatenate(rows), per_prompt + 1)


def _stream_batch(vae, tok, seed: int, step: int, batch: int, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh base-training scenes for one step, a function of (seed, step) only: latents (B, 4, 16, 16), ids."""
    rng = np.random.default_rng([seed, 3, step])
    rendered = [S.render(S.sample_base_scene(rng), seed=int(rng.integers(2**31))) for _ in range(batch)]
    x = images_to_tensor(np.stack([r.image for r in rendered])).to(vae.device)
    # bf16 encoding: ~0.4 % relative error on the latents, far below the noise added to them
    with torch.no_grad(), torch.autocast(vae.device.type, dtype=torch.bfloat16, enabled=autocast):
        z = vae.encode(x).latent_dist.mean
    ids = tokenize(tok, [r.caption for r in rendered]).to(vae.device)
    return z.float() * vae.config.scaling_factor, ids


def _mtime(folder) -> float | None:
    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _lr_factor(step: int, total: int, warmup: int, resume_step: int, resume_warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup) * min(1.0, (step - resume_step + 1) / resume_warmup)
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))


def train_base(vae_dir: str | Path | None, data_path: str | Path | None, folder: str | Path, runs_dir: str | Path,
               minutes: float = 100.0, total_steps: int | None = None, seed: int = 0, batch: int = 32,
               lr: float = 5e-4, warmup: int = 300, resume_warmup: int = 100, ema_decay: float = 0.999,
               cond_drop: float = 0.1, save_every_min: float = 12.0, n: int = 30000, size: str = "mini",
               autocast: bool = True, log_every: int = 50, max_steps: int | None = None,
               callback: Callable[[int, float], None] | None = None, grid_kwargs: dict | None = None,
               device: str = "cpu", workers: int = 0, fit_minutes: float | None = None,
               rendered: tuple | None = None) -> dict:
    """Train text encoder + UNet until ``minutes`` pass or ``total_steps`` (or ``max_steps``) is reached.

    ``total_steps`` is the length of the LR schedule: when resuming it defaults to the saved one (else 3000).

    Resumes from ``folder`` when it holds a ``training_state.json`` (see the module docstring). The VAE comes
    from the folder when resuming, else from ``vae_dir``. With ``data_path=None`` every step renders and
    encodes fresh scenes (a function of seed and step, so resuming is exact); else a cached dataset is used
    (rendered by ``workers`` processes in seeded chunks when ``workers`` > 0, see :func:`build_dataset`).
    ``grid_kwargs`` go to :func:`sample_grid` for the progress grids. ``device`` is where the models train
    (the random draws stay on CPU generators, seeded per step). ``fit_minutes`` (fresh runs only) shortens
    the schedule to the number of steps that fit that many minutes from the start, timed over the first
    steps; the steps chosen are saved in the state, so ``--total-steps`` reproduces the run. Returns the
    final training state.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder, runs_dir = Path(folder), Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    state = read_training_state(folder)
    if total_steps is None:
        total_steps = int(state["total_steps"]) if state is not None else 3000
    full_ckpt = runs_dir / "base-last.pt"
    dev = torch.device(device)
    if state is not None:
        vae = load_vae(folder / "vae").to(dev)
    else:
        if vae_dir is None:
            raise FileNotFoundError(f"{folder} has no {folder / 'training_state.json'} and no VAE folder was given")
        vae = load_vae(vae_dir).to(dev)
    from loraclr.world.tokenizer import load_tokenizer

    tok = load_tokenizer()
    empty_ids = tokenize(tok, [""])[0].to(dev)  # (77,) the unconditional prompt, as CFG feeds it
    if data_path is not None:
        data = build_dataset(vae, data_path, n=n, seed=seed, workers=workers, device=device, rendered=rendered)
        latents, input_ids = data["latents"].to(dev), data["input_ids"].long().to(dev)
        n_data, data_seed = latents.shape[0], data["seed"]
    else:
        n_data, data_seed = None, seed

    ckpt = None
    if state is not None and full_ckpt.exists():
        ckpt = torch.load(full_ckpt, weights_only=False, map_location="cpu")
        if ckpt.get("step") != state["step"]:
            ckpt = None
    if state is not None and ckpt is None:
        log.info("resuming from %s at step %d (fp16 weights -> fp32, fresh optimizer, %d warm-up steps)",
                 folder, state["step"], resume_warmup)
        te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), dtype=torch.float32)
    else:
        te, unet = build_text_and_unet(size, seed)
    if ckpt is not None:
        log.info("resuming from the full checkpoint %s at step %d", full_ckpt, ckpt["step"])
        te.load_state_dict(ckpt["te"])
        unet.load_state_dict(ckpt["unet"])
    te, unet = te.to(dev), unet.to(dev)
    ema_te, ema_unet = copy.deepcopy(te).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    if ckpt is not None:
        ema_te.load_state_dict(ckpt["ema_te"])
        ema_unet.load_state_dict(ckpt["ema_unet"])
    te.train()
    unet.train()
    params = list(te.parameters()) + list(unet.parameters())
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    # no weight decay: the token-embedding table is dense and would shrink rows the captions never use
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=dev.type == "cuda")
    step = 0 if state is None else int(state["step"])
    resume_step = step if (state is not None and ckpt is None) else -10**9
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
    seen = 0 if state is None else int(state.get("images_seen", 0))
    noise_sched = make_scheduler("ddpm")
    acp = noise_sched.alphas_cumprod.to(dev)  # (1000,)
    end_step = total_steps if max_steps is None else min(total_steps, step + max_steps)

    vae_mtime = _mtime(vae_dir) if state is None and vae_dir is not None else None

    def checkpoint(loss_avg: float) -> dict:
        nonlocal vae, vae_mtime
        if vae_mtime is not None and _mtime(vae_dir) not in (None, vae_mtime):
            # a newer decoder from finetune_decoder: same encoder (checked), so the latents do not move
            try:
                new = load_vae(vae_dir)
            except OSError:  # caught in the middle of the decoder's folder swap: try at the next checkpoint
                return _checkpoint(loss_avg)
            same = all(torch.equal(a, b) for a, b in zip(new.encoder.state_dict().values(),
                                                        vae.encoder.state_dict().values(), strict=True))
            if same:
                log.info("using the newer VAE decoder from %s", vae_dir)
                vae, vae_mtime = new, _mtime(vae_dir)
            else:
                log.error("%s has a different VAE encoder than the one training uses; keeping the old VAE", vae_dir)
        return _checkpoint(loss_avg)

    def _checkpoint(loss_avg: float) -> dict:
        st = {"step": step, "total_steps": total_steps, "seed": seed, "batch": batch, "lr": lr, "device": dev.type,
              "warmup": warmup, "resume_warmup": resume_warmup, "ema_decay": ema_decay, "cond_drop": cond_drop,
              "images_seen": seen, "data": {"n": n_data or "stream", "seed": data_seed}, "loss_recent": loss_avg,
              "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "weights": "EMA of the trained weights",
              "resume": "reload fp16 weights in fp32, restart AdamW with resume_warmup steps of linear warm-up"}
        if fitted is not None:
            st["total_steps_how"] = fitted
        if state is not None:
            st["history"] = state.get("history", []) + [{"resumed_at": state["step"]}]
        save_pipeline_folder(vae, ema_te, ema_unet, folder, st)
        torch.save({"step": step, "te": te.state_dict(), "unet": unet.state_dict(),
                    "ema_te": ema_te.state_dict(), "ema_unet": ema_unet.state_dict(), "opt": opt.state_dict()},
                   full_ckpt.with_suffix(".tmp"))
        full_ckpt.with_suffix(".tmp").rename(full_ckpt)
        pipe = assemble_pipeline(vae, ema_te.eval(), ema_unet.eval())
        t = time.time()
        with torch.no_grad():
            save_png(sample_grid(pipe, **(grid_kwargs or {})), runs_dir / "samples" / f"step-{step:06d}.png", scale=2)
        log.info("checkpoint at step %d -> %s (+ sample grid in %.1fs)", step, folder, time.time() - t)
        return st

    t_last_save = time.time()
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet read back from the device (one sync per log line)
    fitted = None
    probe_from = None
    t_log = time.time()
    st = state or {}
    while step < end_step and (time.time() - t_start) < minutes * 60:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if n_data is not None:
            idx = torch.randint(0, n_data, (batch,), generator=g).to(dev)
            x0 = latents[idx].float()  # (B, 4, 16, 16)
            ids = input_ids[idx]  # (B, 77)
        else:
            x0, ids = _stream_batch(vae, tok, seed, step, batch, autocast)
        drop = (torch.rand(batch, generator=g) < cond_drop).to(dev)
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, acp.shape[0], (batch,), generator=g).to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, total_steps, warmup, resume_step, resume_warmup)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            cond = te(ids)[0]  # (B, 77, hidden): last hidden state, as the pipeline uses
            pred = unet(xt, t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        seen += batch
        pending.append(loss.detach())
        if callback is not None or step % log_every == 0 or step >= end_step:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()
        if callback is not None:
            callback(step, losses[-1])
        if fit_minutes is not None and state is None and fitted is None:
            if step == 10:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                probe_from = (step, time.time())
            elif probe_from is not None and step == probe_from[0] + 40:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                per_step = (time.time() - probe_from[1]) / 40
                left = fit_minutes * 60 - (time.time() - t_start)
                fit = max(step + 1, int(step + left / per_step) // 50 * 50)
                fitted = (f"fitted to {fit_minutes:g} min on {dev.type}: {per_step * 1000:.1f} ms/step over "
                          f"steps {probe_from[0]}-{step}; {total_steps} -> {min(total_steps, fit)} steps")
                total_steps = min(total_steps, fit)
                end_step = total_steps if max_steps is None else min(total_steps, end_step)
                log.info("schedule %s", fitted)
        if step % log_every == 0:
            dt = time.time() - t_log
            log.info("base step %d/%d loss %.4f lr %.2e %.1f img/s elapsed %.1f min", step, total_steps,
                     float(np.mean(losses[-log_every:])), opt.param_groups[0]["lr"], log_every * batch / dt,
                     (time.time() - t_start) / 60)
            t_log = time.time()
        if time.time() - t_last_save > save_every_min * 60 and losses:
            st = checkpoint(float(np.mean(losses[-200:])))
            t_last_save = time.time()
    if pending:
        losses.extend(torch.stack(pending).float().cpu().tolist())
    if losses:
        st = checkpoint(float(np.mean(losses[-200:])))
    log.info("base training stopped at step %d/%d after %.1f min", step, total_steps, (time.time() - t_start) / 60)
    return st
