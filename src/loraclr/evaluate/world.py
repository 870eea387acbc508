"""The miniature world's evaluators ("our ArcFace" and "our CLIP"), their calibration, and references.

Weights and calibration ship in ``loraclr/world/assets/evaluators`` (made by ``scripts/train_evaluators.py``).

Identity threshold: the distance under which 5 % of "near misses" are accepted on held-out clean renders. A
near miss is a concept with exactly one trait changed (face, accessory, pattern, pattern colour, colour or
shape), so "recognised" means closer to the concept than 95 % of creatures that get one trait wrong.
Accuracy, near-miss / other-concept / base-pool false accepts are then measured on a second held-out set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from loraclr.evaluate import metrics, regions
from loraclr.evaluate.base import FULL, Evaluators, batched, to_tensor
from loraclr.evaluate.nets import IdentityNet, TextImageNet, load_net
from loraclr.world import evaluator_training as T
from loraclr.world import scenes as S

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets" / "evaluators"
CALIBRATION = "evaluators.json"
NEAR_FAR = 0.05  # share of one-trait variants of a concept that the identity threshold accepts
N_REFERENCES = 8


class WorldTextImage:
    """Our CLIP. It knows the world's words only: prompts must use descriptions, not LoRA trigger words."""

    name = "world-clip"

    def __init__(self, net: TextImageNet, tokenizer=None):
        from loraclr.world.tokenizer import load_tokenizer

        self.net = net
        self.tokenizer = tokenizer or load_tokenizer()

    def embed_images(self, images: Tensor) -> Tensor:
        return batched(self.net.encode_image, to_tensor(images))

    def embed_texts(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.net.max_len).input_ids
        return batched(self.net.encode_ids, self.net.compact(ids))


class WorldIdentity:
    """Our ArcFace: the identity net on each box's crop."""

    name = "world-identity"

    def __init__(self, net: IdentityNet, threshold: float = float("nan")):
        self.net = net
        self.threshold = threshold

    def embed_regions(self, images: Tensor, boxes: Tensor) -> Tensor:
        x = to_tensor(images)
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        crops = regions.crop_resize(x, b, self.net.input_size)
        return batched(self.net, crops)


def load_world_evaluator(folder: str | Path = ASSETS, calibrated: bool = True) -> Evaluators:
    """Our evaluators from ``folder``. ``calibrated=False`` skips the threshold (for calibrating)."""
    folder = Path(folder)
    ident, _ = load_net(folder / "identity.safetensors")
    clip, _ = load_net(folder / "text_image.safetensors")
    info: dict = {}
    threshold = float("nan")
    if calibrated:
        path = folder / CALIBRATION
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no calibration; run scripts/train_evaluators.py calibrate")
        info = json.loads(path.read_text(encoding="utf-8"))
        threshold = float(info["identity"]["threshold"])
    return Evaluators(WorldTextImage(clip), WorldIdentity(ident, threshold), info)


# --- references ------------------------------------------------------------------------------------------

def identity_references(identity: WorldIdentity, idents: list[S.Identity], n: int = N_REFERENCES,
                        seed: int = 0) -> Tensor:
    """(C, D): per identity, the mean embedding of ``n`` clean reference renders (whole image region)."""
    out = []
    for ident in idents:
        imgs = to_tensor([r.image for r in S.reference_renders(ident, n, seed)])
        emb = identity.embed_regions(imgs, torch.tensor([FULL] * len(imgs)))
        out.append(metrics.reference_embedding(emb))
    return torch.stack(out)


def _sample_embeddings(identity: WorldIdentity, idents: list[S.Identity], n: int, seed: int,
                       n_chars_p=(0.5, 0.35, 0.15), camera=None) -> tuple[Tensor, Tensor, Tensor]:
    """Embeddings of ``n`` held-out renders per identity (in varied layouts with base-pool neighbours, each
    scored in its slot region); (B, D), identity index (B,), number of characters (B,). ``camera``: a VAE
    the renders are first round-tripped through (:func:`loraclr.world.evaluator_training.camera_roundtrip`)."""
    imgs, boxes, who, nch = [], [], [], []
    for k, ident in enumerate(idents):
        for r, i in S.identity_samples(ident, n, seed=seed, n_chars_p=n_chars_p):
            chars = r.scene.ordered()
            imgs.append(r.image)
            boxes.append(regions.region(len(chars), chars[i].slot))
            who.append(k)
            nch.append(len(chars))
    if camera is not None:
        imgs = list(T.camera_roundtrip(torch.from_numpy(np.stack(imgs)), camera).numpy())
    emb = identity.embed_regions(to_tensor(imgs), torch.tensor(boxes))
    return emb, torch.tensor(who), torch.tensor(nch)


def calibrate(ev: Evaluators, seed: int = 0, n_per_concept: int = 40, n_base: int = 400,
              near_far: float = NEAR_FAR, camera=None) -> dict:
    """Set the identity threshold on held-out set A and measure on held-out set B (see module doc).

    ``camera``: the world's VAE. Then the threshold is set on set A seen through it (generated images can
    at best look like that) and set B is measured both clean (``accuracy`` etc.) and through it (``camera``).
    """
    ident = ev.identity
    names = list(S.CONCEPTS)
    concepts = [S.CONCEPTS[n] for n in names]
    refs = identity_references(ident, concepts)
    rng = np.random.default_rng([seed, 4242])
    base = [S.sample_base_identity(rng) for _ in range(2 * n_base)]
    near = T.near_misses(concepts)
    near_owner = torch.tensor([next(k for k, c in enumerate(concepts) if _n_diff(c, x) == 1) for x in near])

    def split(offset: int, base_ids: list[S.Identity], cam=None):
        emb, who, nch = _sample_embeddings(ident, concepts, n_per_concept, seed=seed + offset, camera=cam)
        b_emb, _, _ = _sample_embeddings(ident, base_ids, 1, seed=seed + offset, camera=cam)
        n_emb, _, _ = _sample_embeddings(ident, near, 1, seed=seed + offset, camera=cam)
        d = metrics.distances(emb, refs)
        nd = metrics.distances(n_emb, refs)
        return d, who, nch, metrics.distances(b_emb, refs), nd[torch.arange(len(nd)), near_owner]

    d, who, _, bd, nd = split(1000, base[:n_base], camera)
    own = torch.zeros_like(d, dtype=torch.bool)
    own[torch.arange(len(d)), who] = True
    genuine = d[own]
    threshold = metrics.threshold_at_far(nd, near_far)
    eer_t, eer = metrics.equal_error_threshold(genuine, nd)
    ident.threshold = threshold

    def measure(d: Tensor, who: Tensor, bd: Tensor, nd: Tensor) -> tuple[dict, Tensor, Tensor]:
        """Recognition and false accepts on one held-out set at the threshold; also (recognised, own mask)."""
        ok = metrics.recognised(d, who, threshold)
        own = torch.zeros_like(d, dtype=torch.bool)
        own[torch.arange(len(d)), who] = True
        return {
            "accuracy": float(ok.float().mean()),
            "nearest_only_accuracy": float((d.argmin(1) == who).float().mean()),
            "near_miss_false_accept": float((nd < threshold).float().mean()),
            "other_concept_false_accept": float((d[~own] < threshold).float().mean()),
            "base_false_accept": float((bd.min(1).values < threshold).float().mean()),
            "per_concept_accuracy": {names[k]: float(ok[who == k].float().mean()) for k in range(len(names))},
        }, ok, own

    cam_report = None
    if camera is not None:
        d, who, _, bd, nd = split(3000, base[n_base:], camera)
        cam_report = measure(d, who, bd, nd)[0]
        cam_report["what"] = "held-out set B round-tripped through the world's VAE (the best a generated image can be)"
    d, who, nch, bd, nd = split(3000, base[n_base:])
    clean, ok, own = measure(d, who, bd, nd)
    return {
        "threshold_domain": "renders round-tripped through the world's VAE" if camera is not None else "renders",
        "camera": cam_report,
        "threshold": threshold,
        "distance": f"1 - cosine to the mean embedding of {N_REFERENCES} reference renders",
        "rule": "recognised = distance to the intended identity < threshold and it is the nearest concept",
        "threshold_rule": f"accepts {near_far:.0%} of one-trait variants of the concepts ({len(near)} "
                          f"near misses, e.g. the right creature with the wrong face) on held-out set A",
        **clean,
        "accuracy_by_characters": {int(n): float(ok[nch == n].float().mean()) for n in nch.unique()},
        "genuine_distance_quantiles_50_90_99": [float(q) for q in torch.quantile(
            d[own], torch.tensor([0.5, 0.9, 0.99]))],
        "near_miss_distance_quantiles_5_50": [float(q) for q in torch.quantile(nd, torch.tensor([0.05, 0.5]))],
        "eer_genuine_vs_near_miss": eer,
        "eer_threshold": eer_t,
        "test_set": f"held-out set B: {n_per_concept} renders per concept (1-3 characters with base-pool "
                    f"neighbours, each scored in its slot region), the {len(near)} near misses, {n_base} other "
                    "base-pool identities",
    }


def _n_diff(a: S.Identity, b: S.Identity) -> int:
    """Traits in which two identities differ (pattern and pattern colour count separately)."""
    return sum(getattr(a, f) != getattr(b, f) for f in ("shape", "colour", "face", "accessory")) + int(
        (a.pattern, a.pattern_colour) != (b.pattern, b.pattern_colour))


def evaluate_retrieval(ev: Evaluators, seed: int = 0, batches: int = 10, batch: int = 100) -> dict:
    """Rate at which the true caption ranks first among ``batch`` held-out renders' captions (and the true
    image among the images), averaged over ``batches`` batches; scenes as in training (concepts, styles)."""
    rng = np.random.default_rng([seed, 9090])
    pool = T.identity_pool(200, seed + 77)
    i2t, t2i, pos, neg = [], [], [], []
    for _ in range(batches):
        rs = [S.render(T.sample_scene(rng, pool), seed=int(rng.integers(2**31))) for _ in range(batch)]
        a = ev.text_image.embed_images(to_tensor([r.image for r in rs]))
        t = ev.text_image.embed_texts([r.caption for r in rs])
        x, y = metrics.retrieval_top1(a, t)
        i2t.append(x)
        t2i.append(y)
        sim = a @ t.T
        pos.append(float(sim.diag().mean()))
        neg.append(float((sim.sum() - sim.diag().sum()) / (batch * (batch - 1))))
    return {"caption_top1": float(np.mean(i2t)), "image_top1": float(np.mean(t2i)),
            "true_pair_cosine": float(np.mean(pos)), "other_pair_cosine": float(np.mean(neg)),
            "protocol": f"{batches} batches of {batch} held-out renders (base scenes with concept identities "
                        "and held-out styles mixed in, as in training); top-1 among the batch"}
