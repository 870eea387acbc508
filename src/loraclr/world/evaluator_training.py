"""Training and calibrating the miniature world's evaluators on the scene generator's ground truth.

Data: scenes from the base sampler in which characters are swapped, with some probability, for a concept
identity (:data:`loraclr.world.scenes.CONCEPTS`) or for one of a fixed pool of base identities (so that each
class is seen many times), and a few scenes in the held-out styles. An evaluator should know every identity
and style, including the held-out ones that the base model never saw.

* identity net: each character's slot region (the one used at evaluation, :mod:`loraclr.evaluate.regions`),
  or its padded box, jittered, blurred and noised like a generated image; a CosFace margin softmax over the
  concept + pool identities and a softmax per trait (every character has traits, pool or not).
* text-image net: whole renders and their captions, symmetric InfoNCE (CLIP's loss).

Used by ``scripts/train_evaluators.py``; everything is seeded. World-specific (it draws on
:mod:`loraclr.world.scenes`), so it lives here and :mod:`loraclr.evaluate` stays generic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from loraclr.evaluate import regions
from loraclr.evaluate.nets import IdentityNet, TextImageNet
from loraclr.world import scenes as S

log = logging.getLogger(__name__)

TRAITS: dict[str, tuple[str, ...]] = {
    "shape": S.SHAPES, "colour": S.BODY_COLOURS, "pattern": S.PATTERNS,
    "pattern_colour": ("none", *S.PATTERN_COLOURS), "face": S.FACES, "accessory": S.ACCESSORIES,
}


def trait_labels(ident: S.Identity) -> list[int]:
    values = {"shape": ident.shape, "colour": ident.colour, "pattern": ident.pattern,
              "pattern_colour": ident.pattern_colour or "none", "face": ident.face, "accessory": ident.accessory}
    return [TRAITS[k].index(values[k]) for k in TRAITS]


@dataclass
class WorldData:
    images: torch.Tensor  # (N, 64, 64, 3) uint8
    captions: list[str]
    styles: list[str]
    crop_image: torch.Tensor  # (M,) index into images, one row per character
    crop_region: torch.Tensor  # (M, 4) slot region (fractions)
    crop_box: torch.Tensor  # (M, 4) the character's padded box (fractions)
    crop_class: torch.Tensor  # (M,) identity class (concepts first, then the pool), -1 for others
    crop_traits: torch.Tensor  # (M, n_traits)
    classes: list[S.Identity]
    images_camera: torch.Tensor | None = None  # images seen through the world's VAE (see camera_roundtrip)


def identity_pool(size: int, seed: int) -> list[S.Identity]:
    """``size`` distinct base-pool identities (seeded)."""
    rng = np.random.default_rng([seed, 7])
    pool: dict[S.Identity, None] = {}
    while len(pool) < size:
        pool[S.sample_base_identity(rng)] = None
    return list(pool)


def near_misses(idents: list[S.Identity]) -> list[S.Identity]:
    """Every base-pool identity that differs from one of ``idents`` in exactly one trait (the pattern and its
    colour count as one trait each): hard negatives, so that a concept drawn with, say, the wrong face is
    not taken for the concept."""
    out: dict[S.Identity, None] = {}
    for c in idents:
        options = [dict(shape=v) for v in S.SHAPES] + [dict(colour=v) for v in S.BODY_COLOURS]
        options += [dict(face=v) for v in S.FACES] + [dict(accessory=v) for v in S.ACCESSORIES]
        options += [dict(pattern=p, pattern_colour=pc) for p in S.PATTERNS
                    for pc in ([None] if p == "plain" else S.PATTERN_COLOURS)]
        for change in options:
            try:
                x = S.replace(c, **change)
            except ValueError:  # e.g. a pattern colour equal to the body colour
                continue
            if x != c and not S.is_held_out(x):
                out[x] = None
    return list(out)


def sample_scene(rng: np.random.Generator, pool: list[S.Identity], p_concept: float = 0.3,
                 p_pool: float = 0.5, p_held_out_style: float = 0.06, near: list[S.Identity] | None = None,
                 p_near: float = 0.0) -> S.Scene:
    base = S.sample_base_scene(rng)
    concepts = list(S.CONCEPTS.values())
    p_near = p_near if near else 0.0
    chars = []
    for c in base.characters:
        u = rng.random()
        if u < p_concept:
            ident = concepts[rng.integers(len(concepts))]
        elif u < p_concept + p_near:
            ident = near[rng.integers(len(near))]
        elif u < p_concept + p_near + (1 - p_concept - p_near) * p_pool:
            ident = pool[rng.integers(len(pool))]
        else:
            ident = c.identity
        chars.append(S.Character(ident, c.slot))
    style = base.style
    if rng.random() < p_held_out_style:
        style = S.HELD_OUT_STYLES[rng.integers(len(S.HELD_OUT_STYLES))]
    return S.Scene(tuple(chars), base.background, style)


def padded_box(box: tuple[int, int, int, int], pad: float = 0.25, size: int = S.SIZE) -> tuple[float, ...]:
    """A render's pixel box grown by ``pad`` of its larger side and made square, as fractions."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * pad)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return ((cx - side / 2) / size, (cy - side / 2) / size, (cx + side / 2) / size, (cy + side / 2) / size)


def _render_chunk(jobs: list[tuple[S.Scene, int]]) -> list[tuple[np.ndarray, str, list]]:
    """(scene, seed) pairs -> (image, caption, boxes) of each render (a pool worker's task; top level, so
    that it pickles under the spawn start method)."""
    out = []
    for scene, seed in jobs:
        r = S.render(scene, seed=seed)
        out.append((r.image, r.caption, list(r.boxes)))
    return out


def _renders(jobs: list[tuple[S.Scene, int]], workers: int, progress: Callable[[int], None] | None):
    """Yield (image, caption, boxes) for ``jobs`` in order: here, or by a pool of ``workers`` processes."""
    def tick(i: int) -> None:
        if progress is not None and i % 1000 == 0:
            progress(i)

    if workers <= 1 or len(jobs) < 2:
        for i, (scene, seed) in enumerate(jobs):
            r = S.render(scene, seed=seed)
            yield r.image, r.caption, r.boxes
            tick(i + 1)
        return
    import multiprocessing as mp

    size = max(1, min(500, -(-len(jobs) // (4 * workers))))  # a few chunks per worker, none too big
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    done = 0
    with mp.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
        for part in pool.imap(_render_chunk, chunks):  # in order
            for item in part:
                yield item
                done += 1
                tick(done)


def render_data(n_scenes: int, seed: int, pool: list[S.Identity], progress: Callable[[int], None] | None = None,
                workers: int = 1, **scene_kw) -> WorldData:
    """``n_scenes`` seeded training scenes (see :func:`sample_scene`) and their renders. ``workers`` > 1:
    render in that many processes (the scenes and seeds are still drawn here, in order: the same data)."""
    rng = np.random.default_rng([seed, 11])
    classes = list(S.CONCEPTS.values()) + list(scene_kw.get("near") or []) + pool
    index: dict[S.Identity, int] = {}
    for c in classes:
        index.setdefault(c, len(index))
    classes = list(index)
    jobs = []
    for _ in range(n_scenes):  # the draws in the order the one-process loop made them: scene, then its seed
        scene = sample_scene(rng, pool, **scene_kw)
        jobs.append((scene, int(rng.integers(2**31))))
    images = np.zeros((n_scenes, S.SIZE, S.SIZE, 3), dtype=np.uint8)
    captions, styles = [], []
    ci, cr, cb, cc, ct = [], [], [], [], []
    for i, ((scene, _), (image, caption, boxes)) in enumerate(zip(jobs, _renders(jobs, workers, progress),
                                                                   strict=True)):
        images[i] = image
        captions.append(caption)
        styles.append(scene.style)
        chars = scene.ordered()
        for char, box in zip(chars, boxes, strict=True):
            ci.append(i)
            cr.append(regions.region(len(chars), char.slot))
            cb.append(padded_box(box))
            cc.append(index.get(char.identity, -1))
            ct.append(trait_labels(char.identity))
    return WorldData(torch.from_numpy(images), captions, styles, torch.tensor(ci), torch.tensor(cr),
                     torch.tensor(cb), torch.tensor(cc), torch.tensor(ct), classes)


@torch.no_grad()
def camera_roundtrip(images_u8: torch.Tensor, vae, batch: int = 128) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 renders -> the same renders encoded by the world's VAE (latent mean) and decoded.

    This is the best any image generated by the miniature model can look (its UNet only ever produces
    latents), and it loses detail the renders have: an identity net trained on blurred renders alone rejects
    most round-tripped concept renders at its threshold although its nearest-concept choice is still mostly
    right. Training and calibrating on round trips too makes the evaluators judge what the model can draw,
    not the VAE's artefacts.

    The VAE may be on any device: each batch goes there and comes back; the result is on the CPU.
    """
    vae = vae.float().eval()
    dev = next(vae.parameters()).device
    out = torch.empty(images_u8.shape, dtype=torch.uint8)
    for i in range(0, len(images_u8), batch):
        x = to_float(images_u8[i:i + batch].to(dev)) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out[i:i + batch] = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return out


def _pick_images(data: WorldData, rows: torch.Tensor, g: torch.Generator, p_camera: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Float images for ``rows`` of ``data.images``, each taken from the camera round trip with p_camera.

    The data and the draws stay on the CPU (``g`` is a CPU generator); the picked uint8 images go to
    ``device`` (default: the CPU) and become floats there."""
    images = data.images[rows]  # a copy (advanced indexing)
    if data.images_camera is not None and p_camera > 0:
        cam = torch.rand(len(rows), generator=g) < p_camera
        if cam.any():
            images[cam] = data.images_camera[rows[cam]]
    return to_float(images.to(device) if device is not None else images)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 255.0


def degrade(x: torch.Tensor, g: torch.Generator, max_sigma: float = 1.2, max_noise: float = 0.04) -> torch.Tensor:
    """Per-image Gaussian blur, brightness / contrast change and noise: generated images are softer than
    renders (the VAE) and not exactly on palette."""
    b, c, h, w = x.shape
    dev = x.device  # the draws come from g on the CPU (same values on any device), then move to x's device
    sigma = (torch.rand(b, generator=g) * max_sigma + 1e-3).to(dev)
    r = torch.arange(-2, 3, dtype=x.dtype, device=dev)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 5)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * c)
    y = y.reshape(b, c, h, w)
    gain = (1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * 0.1).to(dev)
    bias = ((torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * 0.05).to(dev)
    noise = (torch.randn(y.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * max_noise).to(dev)
    return (y * gain + bias + noise).clamp(0, 1)


def _cosine_lr(step: int, total: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train_identity(data: WorldData, steps: int, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                   input_size: int = 48, scale: float = 16.0, margin: float = 0.2, p_box: float = 0.25,
                   autocast: bool = True, stem_stride: int = 1, p_camera: float = 0.5,
                   callback: Callable[[int, float], None] | None = None,
                   device: str | torch.device | None = None) -> IdentityNet:
    """CosFace over ``data.classes`` + trait softmaxes; crops only from unstyled / pastel renders, taken from
    the camera round trip (``data.images_camera``) with probability ``p_camera``.

    ``device``: where the net trains (default cpu). The data and every random draw stay on the CPU (the same
    draws on any device); each batch is moved there. The returned net is on the CPU, in eval mode."""
    dev = torch.device(device if device is not None else "cpu")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = IdentityNet(input_size, traits={k: len(v) for k, v in TRAITS.items()}, stem_stride=stem_stride)
    classes = nn.Parameter(torch.randn(len(data.classes), net.config["dim"]) * 0.01)
    net.to(dev)  # initialised on the CPU (seeded as before), then moved
    classes = nn.Parameter(classes.detach().to(dev))
    params = list(net.parameters()) + [classes]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    style_ok = torch.tensor([s in ("none", "pastel") for s in data.styles])
    usable = torch.nonzero(style_ok[data.crop_image]).squeeze(1)
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        rows = usable[torch.randint(len(usable), (batch,), generator=g)]
        images = degrade(_pick_images(data, data.crop_image[rows], g, p_camera, dev), g)
        use_box = torch.rand(batch, generator=g) < p_box
        boxes = torch.where(use_box[:, None], data.crop_box[rows], data.crop_region[rows])
        crops = regions.crop_resize(images, regions.jitter_boxes(boxes, g).to(dev), input_size)
        traits = data.crop_traits[rows].to(dev)
        labelled = data.crop_class[rows] >= 0  # on the CPU: no device sync for the test below
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            emb = net.tower(crops)
        emb = F.normalize(emb.float(), dim=-1)
        loss = sum(F.cross_entropy(head(emb * scale), traits[:, i])
                   for i, head in enumerate(net.heads.values())) / len(net.heads)
        if labelled.any():
            cos = emb[labelled.to(dev)] @ F.normalize(classes, dim=-1).T
            target = data.crop_class[rows][labelled].to(dev)
            cos = cos - margin * F.one_hot(target, len(data.classes))
            loss = loss + F.cross_entropy(scale * cos, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step, float(loss.detach().cpu()))
    net.eval()
    return net.cpu()


def world_vocabulary(tokenizer, captions: list[str]) -> list[int]:
    """The CLIP token ids of the world's captions (and of every trait, background and style phrase)."""
    extra = [S.caption_identity(i) for i in S.CONCEPTS.values()]
    extra += [" ".join(TRAITS[k]) for k in TRAITS] + list(S.BACKGROUND_PHRASE.values())
    extra += list(S.STYLE_PHRASE.values())
    ids: set[int] = set()
    for text in list(dict.fromkeys(captions)) + extra:
        ids.update(tokenizer(text).input_ids)
    return sorted(ids)


def tokenize(net: TextImageNet, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(list(texts), truncation=True, max_length=net.max_len).input_ids
    return net.compact(ids)


def train_text_image(data: WorldData, tokenizer, steps: int, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                     autocast: bool = True, p_camera: float = 0.5,
                     callback: Callable[[int, float], None] | None = None,
                     device: str | torch.device | None = None) -> TextImageNet:
    """Symmetric InfoNCE on (render, caption) pairs; duplicate captions in a batch are rare (random scenes).

    ``device`` as in :func:`train_identity`: draws on the CPU, batches moved; the net comes back on the CPU."""
    dev = torch.device(device if device is not None else "cpu")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net = TextImageNet(world_vocabulary(tokenizer, data.captions))
    ids_all = tokenize(net, tokenizer, data.captions)  # on the CPU, before the net moves
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        rows = torch.randint(len(data.captions), (batch,), generator=g)
        images = degrade(_pick_images(data, rows, g, p_camera, dev), g, max_sigma=0.8, max_noise=0.03)
        ids = ids_all[rows]
        ids = ids[:, : int((ids != 0).sum(1).max())].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            a = net.image(images)
            t = net.text(ids)
        a, t = F.normalize(a.float(), dim=-1), F.normalize(t.float(), dim=-1)
        logits = a @ t.T * net.logit_scale.clamp(max=np.log(100)).exp()
        target = torch.arange(batch, device=dev)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step, float(loss.detach().cpu()))
    net.eval()
    return net.cpu()


class Timer:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0
