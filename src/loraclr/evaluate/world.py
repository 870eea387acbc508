"""The miniature world's evaluators ("our ArcFace" and "our CLIP"), their calibration, and references.

Weights and calibration ship in ``loraclr/world/assets/evaluators`` (made by ``scripts/train_evaluators.py``).

Identity threshold: the distance at which 1 % of impostor pairs are accepted on held-out clean renders
(impostors: each concept's renders against the other concepts' references, and renders of base-pool
identities against every concept's reference). Accuracy is then measured on a second held-out set.
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
from loraclr.world import scenes as S

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets" / "evaluators"
CALIBRATION = "evaluators.json"
FAR = 0.01  # false-accept rate the identity threshold is set at
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
                       n_chars_p=(0.5, 0.35, 0.15)) -> tuple[Tensor, Tensor, Tensor]:
    """Embeddings of ``n`` held-out renders per identity (in varied layouts with base-pool neighbours, each
    scored in its slot region); (B, D), identity index (B,), number of characters (B,)."""
    imgs, boxes, who, nch = [], [], [], []
    for k, ident in enumerate(idents):
        for r, i in S.identity_samples(ident, n, seed=seed, n_chars_p=n_chars_p):
            chars = r.scene.ordered()
            imgs.append(r.image)
            boxes.append(regions.region(len(chars), chars[i].slot))
            who.append(k)
            nch.append(len(chars))
    emb = identity.embed_regions(to_tensor(imgs), torch.tensor(boxes))
    return emb, torch.tensor(who), torch.tensor(nch)


def calibrate(ev: Evaluators, seed: int = 0, n_per_concept: int = 40, n_base: int = 400, far: float = FAR) -> dict:
    """Set the identity threshold on one held-out set and measure accuracy on another (see module doc)."""
    ident = ev.identity
    names = list(S.CONCEPTS)
    concepts = [S.CONCEPTS[n] for n in names]
    refs = identity_references(ident, concepts)
    rng = np.random.default_rng([seed, 4242])
    base = [S.sample_base_identity(rng) for _ in range(2 * n_base)]

    def split(offset: int, base_ids: list[S.Identity]):
        emb, who, nch = _sample_embeddings(ident, concepts, n_per_concept, seed=seed + offset)
        b_emb, _, b_nch = _sample_embeddings(ident, base_ids, 1, seed=seed + offset)
        return metrics.distances(emb, refs), who, nch, metrics.distances(b_emb, refs), b_nch

    d, who, _, bd, _ = split(1000, base[:n_base])
    own = torch.zeros_like(d, dtype=torch.bool)
    own[torch.arange(len(d)), who] = True
    genuine, impostor = d[own], torch.cat([d[~own], bd.flatten()])
    threshold = metrics.threshold_at_far(impostor, far)
    eer_t, eer = metrics.equal_error_threshold(genuine, impostor)
    ident.threshold = threshold

    d, who, nch, bd, _ = split(3000, base[n_base:])
    ok = metrics.recognised(d, who, threshold)
    # a base-pool character "recognised" as some concept: nearest concept under the threshold
    base_fa = (bd.min(1).values < threshold).float().mean()
    per_concept = {names[k]: float(ok[who == k].float().mean()) for k in range(len(names))}
    result = {
        "threshold": threshold,
        "distance": "1 - cosine to the mean embedding of 8 reference renders",
        "rule": "recognised = distance to the intended identity < threshold and it is the nearest concept",
        "threshold_rule": f"false-accept rate {far} over impostor pairs on held-out set A "
                          f"({n_per_concept} renders per concept, {n_base} base-pool identities)",
        "accuracy": float(ok.float().mean()),
        "accuracy_by_characters": {int(n): float(ok[nch == n].float().mean()) for n in nch.unique()},
        "nearest_only_accuracy": float((d.argmin(1) == who).float().mean()),
        "base_false_accept": float(base_fa),
        "genuine_distance_mean": float(genuine.mean()),
        "impostor_distance_mean": float(impostor.mean()),
        "eer": eer,
        "eer_threshold": eer_t,
        "per_concept_accuracy": per_concept,
        "test_set": f"held-out set B: {n_per_concept} renders per concept (1-3 characters, base-pool "
                    f"neighbours), {n_base} other base-pool identities",
    }
    return result


def evaluate_retrieval(ev: Evaluators, seed: int = 0, batches: int = 10, batch: int = 100) -> dict:
    """Rate at which the true caption ranks first among ``batch`` held-out renders' captions (and the true
    image among the images), averaged over ``batches`` batches; scenes as in training (concepts, styles)."""
    from loraclr.evaluate import train as T

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
