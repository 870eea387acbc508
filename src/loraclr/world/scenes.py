"""Procedural 64x64 scenes of little creatures, with captions and boxes, deterministic from a seed.

A character is an :class:`Identity`: a combination of visual traits (body shape, body colour, pattern and its
colour, face, accessory). A :class:`Scene` places 1-3 characters in fixed slots (left / middle / right) on a
background, optionally in a style. :func:`render` draws it and writes an ordinary English caption that
describes exactly what is drawn.

A fixed set of concept identities (:data:`CONCEPTS`, with short names) is held out: base-training samplers
never draw them, so a LoRA that teaches one is teaching something new. They come in groups that share body
colour or shape, so that telling them apart takes more than one trait. Two styles (:data:`HELD_OUT_STYLES`)
are held out the same way, for style concepts.

Public API: ``Identity``, ``Scene``, ``Rendered``, ``CONCEPTS``, ``concept``, ``render``,
``sample_base_scene``, ``sample_base_identity``, ``is_held_out``, ``identity_samples``,
``reference_renders``, ``caption_identity``. Pure numpy / PIL, no torch.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64  # output image side (pixels)
_SS = 2  # supersampling factor for drawing (drawn at 128 px, averaged down to 64)

# --- traits -----------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 35),
    "green": (50, 165, 60),
    "blue": (45, 85, 215),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "white": (240, 240, 240),
    "black": (30, 30, 30),
}
BODY_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
PATTERN_COLOURS = tuple(COLOURS)  # any colour but the body's
SHAPES = ("round", "tall", "square", "pointy")  # pointy = a cone / triangle
PATTERNS = ("plain", "stripes", "spots", "checks")
FACES = ("two eyes", "one eye", "three eyes", "glasses")
ACCESSORIES = ("none", "a hat", "a crown", "a bow", "a scarf")
_ACCESSORY_COLOURS = {"a hat": (25, 25, 25), "a crown": (250, 200, 20), "a bow": (250, 90, 170),
                      "a scarf": (20, 190, 200)}
# body width / height per shape
_ASPECT = {"round": 0.95, "tall": 0.6, "square": 0.85, "pointy": 0.95}

BACKGROUNDS = ("beach", "forest", "snow", "city", "night", "room")
_BACKGROUND_PHRASE = {"beach": "at the beach", "forest": "in a forest", "snow": "in the snow",
                      "city": "in the city", "night": "at night", "room": "in a room"}
STYLES = ("none", "pastel", "grayscale", "mosaic", "sketch")
_STYLE_PHRASE = {"none": "", "pastel": "in pastel style", "grayscale": "in black and white",
                 "mosaic": "as a mosaic", "sketch": "as a pencil sketch"}
BACKGROUND_PHRASE = _BACKGROUND_PHRASE  # public names: background -> caption words
STYLE_PHRASE = _STYLE_PHRASE  # style -> caption words ("" for none)
HELD_OUT_STYLES = ("mosaic", "sketch")  # never in base training: for style-concept LoRAs

SLOTS = ("left", "middle", "right")
# slot -> centre x (pixels) for each number of characters
_LAYOUT_X = {1: {"middle": 32.0, "left": 20.0, "right": 44.0}, 2: {"left": 17.0, "right": 47.0},
             3: {"left": 11.0, "middle": 32.0, "right": 53.0}}
_HEIGHT = {1: 30.0, 2: 25.0, 3: 19.0}  # body height (pixels) by number of characters


@dataclass(frozen=True)
class Identity:
    """A character's traits. ``pattern_colour`` is ``None`` exactly when ``pattern == "plain"``."""

    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str | None = None
    face: str = "two eyes"
    accessory: str = "none"

    def __post_init__(self) -> None:
        checks = [("shape", self.shape, SHAPES), ("colour", self.colour, BODY_COLOURS),
                  ("pattern", self.pattern, PATTERNS), ("face", self.face, FACES),
                  ("accessory", self.accessory, ACCESSORIES)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"Identity.{name}={value!r} is not one of {allowed}")
        if (self.pattern == "plain") != (self.pattern_colour is None):
            raise ValueError(f"Identity: pattern {self.pattern!r} with pattern_colour {self.pattern_colour!r}; "
                             "a plain body has no pattern colour and a pattern needs one")
        if self.pattern_colour is not None and (self.pattern_colour not in PATTERN_COLOURS
                                                or self.pattern_colour == self.colour):
            raise ValueError(f"Identity.pattern_colour={self.pattern_colour!r} must be a colour of "
                             f"{PATTERN_COLOURS} other than the body colour {self.colour!r}")


def caption_identity(ident: Identity) -> str:
    """Ordinary words for an identity, e.g. ``"a round red creature with blue stripes, one eye and a hat"``."""
    parts = []
    if ident.pattern != "plain":
        parts.append(f"{ident.pattern_colour} {ident.pattern}")
    parts.append(ident.face)
    if ident.accessory != "none":
        parts.append(ident.accessory)
    tail = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a {ident.shape} {ident.colour} creature with {tail}"


# --- held-out concept identities ---------------------------------------------------------------------------

def _I(shape, colour, pattern="plain", pcol=None, face="two eyes", acc="none") -> Identity:
    return Identity(shape, colour, pattern, pcol, face, acc)


# Four groups of four that share body shape and colour, plus pairs that share other traits across groups,
# so that one trait never tells a concept apart from all the others.
CONCEPTS: dict[str, Identity] = {
    # group 1: round red
    "rubo": _I("round", "red", "stripes", "white", "two eyes", "a hat"),
    "rika": _I("round", "red", "spots", "yellow", "one eye", "a bow"),
    "rono": _I("round", "red", "stripes", "yellow", "glasses", "none"),
    "ruzi": _I("round", "red", "plain", None, "three eyes", "a crown"),
    # group 2: tall blue
    "tavi": _I("tall", "blue", "checks", "white", "two eyes", "a scarf"),
    "teko": _I("tall", "blue", "spots", "white", "glasses", "a hat"),
    "tumi": _I("tall", "blue", "plain", None, "one eye", "a crown"),
    "tobi": _I("tall", "blue", "stripes", "orange", "three eyes", "a bow"),
    # group 3: square green
    "gaso": _I("square", "green", "stripes", "white", "one eye", "a hat"),
    "gilu": _I("square", "green", "checks", "yellow", "two eyes", "a bow"),
    "gomo": _I("square", "green", "spots", "purple", "glasses", "a scarf"),
    # group 4: pointy purple / pink
    "pemi": _I("pointy", "purple", "spots", "yellow", "two eyes", "a crown"),
    "pilo": _I("pointy", "purple", "stripes", "white", "three eyes", "a scarf"),
    "puna": _I("pointy", "pink", "spots", "yellow", "glasses", "a crown"),
    "pazu": _I("pointy", "pink", "checks", "black", "one eye", "none"),
    "peri": _I("round", "pink", "stripes", "white", "glasses", "a bow"),
}
_HELD_OUT = frozenset(CONCEPTS.values())


def concept(name: str) -> Identity:
    """The held-out identity called ``name`` (see :data:`CONCEPTS`)."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown concept {name!r}; known: {sorted(CONCEPTS)}")
    return CONCEPTS[name]


def is_held_out(ident: Identity) -> bool:
    return ident in _HELD_OUT


# --- scenes -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Character:
    identity: Identity
    slot: str  # "left" | "middle" | "right"


@dataclass(frozen=True)
class Scene:
    characters: tuple[Character, ...]
    background: str = "room"
    style: str = "none"

    def __post_init__(self) -> None:
        n = len(self.characters)
        if n not in _LAYOUT_X:
            raise ValueError(f"a scene holds 1-3 characters, got {n}")
        slots = [c.slot for c in self.characters]
        if len(set(slots)) != n or any(s not in _LAYOUT_X[n] for s in slots):
            raise ValueError(f"slots {slots} are not valid for {n} characters; use {list(_LAYOUT_X[n])}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {BACKGROUNDS}")
        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r} is not one of {STYLES}")

    def ordered(self) -> tuple[Character, ...]:
        """Characters from left to right."""
        return tuple(sorted(self.characters, key=lambda c: SLOTS.index(c.slot)))


@dataclass
class Rendered:
    image: np.ndarray  # (64, 64, 3) uint8
    caption: str
    boxes: list[tuple[int, int, int, int]]  # per character of scene.ordered(): (x0, y0, x1, y1), exclusive
    scene: Scene
    character_phrases: list[str] = field(default_factory=list)  # caption words per character, same order


def caption_scene(scene: Scene) -> tuple[str, list[str]]:
    """The caption of a scene and, per character (left to right), the words that describe it."""
    chars = scene.ordered()
    phrases = [caption_identity(c.identity) for c in chars]
    n = len(chars)
    if n == 1:
        slot = chars[0].slot
        body = phrases[0] if slot == "middle" else f"{phrases[0]} on the {slot}"
    elif n == 2:
        body = f"{phrases[0]} on the left and {phrases[1]} on the right"
    else:
        body = f"{phrases[0]} on the left, {phrases[1]} in the middle and {phrases[2]} on the right"
    caption = f"{body} {_BACKGROUND_PHRASE[scene.background]}"
    if scene.style != "none":
        caption += ", " + _STYLE_PHRASE[scene.style]
    return caption, phrases


# --- drawing ----------------------------------------------------------------------------------------------

def _rgb(name: str) -> tuple[int, int, int]:
    return COLOURS[name]


def _draw_background(draw: ImageDraw.ImageDraw, bg: str, rng: np.random.Generator, s: int) -> None:
    W = SIZE * s
    horizon = int((38 + rng.integers(-3, 4)) * s)
    if bg == "beach":
        draw.rectangle([0, 0, W, horizon - 8 * s], fill=(150, 205, 245))
        draw.rectangle([0, horizon - 8 * s, W, horizon], fill=(40, 120, 190))
        draw.rectangle([0, horizon, W, W], fill=(235, 210, 150))
        sx = int(rng.integers(6, 58)) * s
        draw.ellipse([sx - 4 * s, 3 * s, sx + 4 * s, 11 * s], fill=(255, 240, 120))
    elif bg == "forest":
        draw.rectangle([0, 0, W, W], fill=(120, 170, 120))
        for _ in range(7):
            x = int(rng.integers(0, 64)) * s
            draw.rectangle([x - s, horizon - 14 * s, x + s, horizon], fill=(90, 60, 30))
            draw.polygon([(x - 6 * s, horizon - 10 * s), (x + 6 * s, horizon - 10 * s),
                          (x, horizon - 26 * s)], fill=(20, 90, 40))
        draw.rectangle([0, horizon, W, W], fill=(70, 120, 50))
    elif bg == "snow":
        draw.rectangle([0, 0, W, horizon], fill=(200, 215, 235))
        for _ in range(3):
            x = int(rng.integers(0, 64)) * s
            draw.polygon([(x - 16 * s, horizon), (x + 16 * s, horizon), (x, horizon - 18 * s)],
                         fill=(150, 160, 185))
        draw.rectangle([0, horizon, W, W], fill=(250, 250, 252))
    elif bg == "city":
        draw.rectangle([0, 0, W, W], fill=(185, 200, 215))
        x = -int(rng.integers(0, 8)) * s
        while x < W:
            w = int(rng.integers(8, 14)) * s
            h = int(rng.integers(14, 30)) * s
            g = int(rng.integers(90, 140))
            draw.rectangle([x, horizon - h, x + w - s, horizon], fill=(g, g, g + 10))
            for wy in range(horizon - h + 3 * s, horizon - 2 * s, 5 * s):
                draw.rectangle([x + 2 * s, wy, x + 4 * s, wy + 2 * s], fill=(235, 225, 150))
            x += w
        draw.rectangle([0, horizon, W, W], fill=(95, 95, 100))
    elif bg == "night":
        draw.rectangle([0, 0, W, horizon], fill=(15, 20, 60))
        for _ in range(14):
            x, y = int(rng.integers(0, 64)) * s, int(rng.integers(0, max(horizon // s - 4, 2))) * s
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=(250, 250, 210))
        mx = int(rng.integers(6, 58)) * s
        draw.ellipse([mx - 4 * s, 3 * s, mx + 4 * s, 11 * s], fill=(240, 240, 200))
        draw.rectangle([0, horizon, W, W], fill=(30, 45, 40))
    elif bg == "room":
        draw.rectangle([0, 0, W, horizon], fill=(225, 205, 175))
        wx = int(rng.integers(6, 44)) * s
        draw.rectangle([wx, 6 * s, wx + 14 * s, 18 * s], fill=(160, 200, 235), outline=(120, 90, 60),
                       width=s)
        draw.rectangle([0, horizon, W, W], fill=(150, 105, 70))
        for fx in range(0, W, 8 * s):
            draw.line([fx, horizon, fx, W], fill=(125, 85, 55), width=1)


def _body_mask(shape: str, box: tuple[float, float, float, float], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape in ("round", "tall"):
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        d.rounded_rectangle([x0, y0, x1, y1], radius=max(1, int((x1 - x0) * 0.15)), fill=255)
    else:  # pointy
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    return mask


def _pattern_layer(pattern: str, colour: tuple[int, int, int], box, size: int, rng, s: int) -> Image.Image:
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if pattern == "stripes":
        step = h / 5.0
        y = y0 + step * 0.5 + rng.uniform(0, 0.3) * step
        while y < y1:
            d.rectangle([x0, y, x1, y + step * 0.5], fill=colour + (255,))
            y += step
    elif pattern == "spots":
        r = max(w, h) * 0.09
        for fx, fy in ((0.3, 0.55), (0.7, 0.5), (0.5, 0.8), (0.25, 0.85), (0.75, 0.82), (0.5, 0.3)):
            cx, cy = x0 + fx * w, y0 + fy * h
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour + (255,))
    elif pattern == "checks":
        n = 4
        cw, ch = w / n, h / n
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    d.rectangle([x0 + i * cw, y0 + j * ch, x0 + (i + 1) * cw, y0 + (j + 1) * ch],
                                fill=colour + (255,))
    return layer


def _eye(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 255), outline=(0, 0, 0), width=1)
    p = r * 0.5
    d.ellipse([cx - p, cy - p * 0.6, cx + p, cy + p * 1.2], fill=(0, 0, 0))


def _draw_character(img: Image.Image, ident: Identity, cx: float, ground: float, h: float,
                    rng: np.random.Generator, s: int) -> tuple[float, float, float, float]:
    """Draw at supersampled scale; returns the box in supersampled pixels (body + accessory)."""
    size = img.size[0]
    w = h * _ASPECT[ident.shape]
    box = (cx - w / 2, ground - h, cx + w / 2, ground)
    x0, y0, x1, y1 = box
    mask = _body_mask(ident.shape, box, size)
    # dark outline: the mask grown by one output pixel, drawn first
    outline = mask.filter(ImageFilter.MaxFilter(2 * s + 1))
    img.paste((20, 20, 20), (0, 0), outline)
    img.paste(_rgb(ident.colour), (0, 0), mask)
    if ident.pattern != "plain":
        layer = _pattern_layer(ident.pattern, _rgb(ident.pattern_colour), box, size, rng, s)
        alpha = Image.fromarray(np.minimum(np.asarray(layer.split()[3]), np.asarray(mask)))
        img.paste(layer.convert("RGB"), (0, 0), alpha)
    d = ImageDraw.Draw(img)
    # face: in the upper part of the body (lower for pointy, whose top is narrow), on a plate of the plain body
    # colour so that no pattern runs through it, with eyes large enough to survive a 4x-downsampling VAE.
    fy = y0 + h * (0.55 if ident.shape == "pointy" else 0.33)
    er = max(w, h * 0.75) * 0.16
    plate = Image.new("L", (size, size), 0)
    ImageDraw.Draw(plate).ellipse([cx - w * 0.44, fy - er * 1.9, cx + w * 0.44, fy + er * 1.9], fill=255)
    plate = Image.fromarray(np.minimum(np.asarray(plate), np.asarray(mask)))
    img.paste(_rgb(ident.colour), (0, 0), plate)
    if ident.face == "two eyes":
        _eye(d, cx - w * 0.2, fy, er)
        _eye(d, cx + w * 0.2, fy, er)
    elif ident.face == "one eye":
        _eye(d, cx, fy, er * 1.6)
    elif ident.face == "three eyes":
        _eye(d, cx - w * 0.25, fy + er * 0.45, er * 0.85)
        _eye(d, cx, fy - er * 0.65, er * 0.85)
        _eye(d, cx + w * 0.25, fy + er * 0.45, er * 0.85)
    else:  # glasses: dark lenses in thick black frames, unlike the white eyes of every other face
        gr = er * 1.1
        for ex in (cx - w * 0.2, cx + w * 0.2):
            d.ellipse([ex - gr, fy - gr, ex + gr, fy + gr], fill=(40, 50, 90), outline=(0, 0, 0), width=max(1, s))
        d.line([cx - w * 0.2 + gr, fy, cx + w * 0.2 - gr, fy], fill=(0, 0, 0), width=2 * s)
    top = y0 if ident.shape != "pointy" else y0 + h * 0.05
    acc = _ACCESSORY_COLOURS.get(ident.accessory)
    bx0, by0, bx1 = x0, y0, x1
    if ident.accessory == "a hat":
        hw = w * 0.45
        d.rectangle([cx - hw * 0.6, top - h * 0.28, cx + hw * 0.6, top + h * 0.02], fill=acc)
        d.rectangle([cx - hw, top - h * 0.02, cx + hw, top + h * 0.05], fill=acc)
        by0 = min(by0, top - h * 0.28)
    elif ident.accessory == "a crown":
        cw = w * 0.35
        base = top + h * 0.04
        pts = [(cx - cw, base), (cx - cw, base - h * 0.22), (cx - cw / 2, base - h * 0.1), (cx, base - h * 0.24),
               (cx + cw / 2, base - h * 0.1), (cx + cw, base - h * 0.22), (cx + cw, base)]
        d.polygon(pts, fill=acc, outline=(90, 60, 0))
        by0 = min(by0, base - h * 0.24)
    elif ident.accessory == "a bow":
        bxc, byc, r = cx + w * 0.18, top - h * 0.02, h * 0.13
        d.polygon([(bxc, byc), (bxc - 2 * r, byc - r), (bxc - 2 * r, byc + r)], fill=acc, outline=(0, 0, 0))
        d.polygon([(bxc, byc), (bxc + 2 * r, byc - r), (bxc + 2 * r, byc + r)], fill=acc, outline=(0, 0, 0))
        d.ellipse([bxc - r * 0.5, byc - r * 0.5, bxc + r * 0.5, byc + r * 0.5], fill=acc)
        by0 = min(by0, byc - r)
    elif ident.accessory == "a scarf":
        sy = y0 + h * (0.62 if ident.shape == "pointy" else 0.55)
        band = Image.new("L", (size, size), 0)
        ImageDraw.Draw(band).rectangle([x0 - s, sy, x1 + s, sy + h * 0.12], fill=255)
        band = Image.fromarray(np.minimum(np.asarray(band), np.asarray(outline)))
        img.paste(acc, (0, 0), band)
        # the hanging end
        d.rectangle([cx + w * 0.12, sy, cx + w * 0.26, sy + h * 0.32], fill=acc, outline=(0, 0, 0))
    return (min(bx0, x0) - s, by0 - s, max(bx1, x1) + s, y1 + s)


def _apply_style(img: np.ndarray, style: str) -> np.ndarray:
    x = img.astype(np.float32)
    if style == "pastel":
        x = x * 0.55 + 255 * 0.45
    elif style == "grayscale":
        g = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = np.repeat(g[..., None], 3, axis=2)
    elif style == "mosaic":
        t = 4  # tile side (pixels)
        h, w = x.shape[:2]
        tiles = x.reshape(h // t, t, w // t, t, 3).mean(axis=(1, 3))
        x = np.repeat(np.repeat(tiles, t, axis=0), t, axis=1)
        x[::t, :, :] = 50
        x[:, ::t, :] = 50
    elif style == "sketch":
        g = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        gx = np.zeros_like(g)
        gy = np.zeros_like(g)
        gx[:, 1:-1] = g[:, 2:] - g[:, :-2]
        gy[1:-1, :] = g[2:, :] - g[:-2, :]
        edge = np.clip(np.hypot(gx, gy) * 2.0, 0, 255)
        paper = np.array([245, 238, 220], dtype=np.float32)
        x = paper[None, None, :] * (1 - edge[..., None] / 255) + np.array([40, 40, 60]) * (edge[..., None] / 255)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _seed_rng(seed: int, *salt: str) -> np.random.Generator:
    extra = [zlib.crc32(t.encode()) for t in salt]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *extra])


def render(scene: Scene, seed: int = 0) -> Rendered:
    """Draw a scene. The same (scene, seed) gives the same pixels, caption and boxes on every machine."""
    rng = _seed_rng(seed, "render")
    s = _SS
    W = SIZE * s
    img = Image.new("RGB", (W, W))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, scene.background, rng, s)
    chars = scene.ordered()
    n = len(chars)
    jitter = {1: 4.0, 2: 2.0, 3: 1.0}[n]
    boxes = []
    for c in chars:
        h = _HEIGHT[n] * rng.uniform(0.92, 1.08)
        cx = _LAYOUT_X[n][c.slot] + rng.uniform(-jitter, jitter)
        ground = 56.0 + rng.uniform(-3, 3)
        b = _draw_character(img, c.identity, cx * s, ground * s, h * s, rng, s)
        boxes.append(tuple(int(v) for v in (np.clip(np.floor(b[0] / s), 0, SIZE), np.clip(np.floor(b[1] / s), 0, SIZE),
                                            np.clip(np.ceil(b[2] / s), 0, SIZE), np.clip(np.ceil(b[3] / s), 0, SIZE))))
    small = img.resize((SIZE, SIZE), Image.BOX)
    arr = _apply_style(np.asarray(small), scene.style)
    caption, phrases = caption_scene(scene)
    return Rendered(arr, caption, boxes, scene, phrases)


# --- samplers ---------------------------------------------------------------------------------------------

def _random_identity(rng: np.random.Generator) -> Identity:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = BODY_COLOURS[rng.integers(len(BODY_COLOURS))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    pcol = None
    if pattern != "plain":
        options = [c for c in PATTERN_COLOURS if c != colour]
        pcol = options[rng.integers(len(options))]
    face = FACES[rng.integers(len(FACES))]
    acc = ACCESSORIES[rng.integers(len(ACCESSORIES))]
    return Identity(shape, colour, pattern, pcol, face, acc)


def sample_base_identity(rng: np.random.Generator) -> Identity:
    """A uniformly random identity from the base pool (every trait combination but the held-out ones)."""
    while True:
        ident = _random_identity(rng)
        if not is_held_out(ident):
            return ident


_N_CHARS_P = (0.4, 0.4, 0.2)  # 1, 2, 3 characters
_BASE_STYLES = [s for s in STYLES if s not in HELD_OUT_STYLES]


def _layout(n: int, rng: np.random.Generator) -> list[str]:
    if n == 1:
        return [("middle", "middle", "left", "right")[rng.integers(4)]]
    return list(_LAYOUT_X[n])


def sample_base_scene(rng: np.random.Generator, styled: float = 0.15) -> Scene:
    """A base-training scene: 1-3 base-pool characters, any background, a base style with prob. ``styled``."""
    n = int(rng.choice([1, 2, 3], p=_N_CHARS_P))
    slots = _layout(n, rng)
    chars = tuple(Character(sample_base_identity(rng), slot) for slot in slots)
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    style = "none"
    if rng.random() < styled:
        options = [s for s in _BASE_STYLES if s != "none"]
        style = options[rng.integers(len(options))]
    return Scene(chars, bg, style)


def identity_samples(ident: Identity, n: int, seed: int = 0, style: str = "none",
                     n_chars_p: tuple[float, float, float] = (0.5, 0.35, 0.15)) -> list[tuple[Rendered, int]]:
    """``n`` renders of ``ident`` in varied slots, backgrounds and layouts with other base-pool characters.

    Returns ``(rendered, index)`` pairs: ``rendered.character_phrases[index]`` is the identity's own caption
    words (a LoRA trainer swaps them for a trigger word) and ``rendered.boxes[index]`` its box.
    """
    rng = _seed_rng(seed, "identity", repr(ident), style)
    out = []
    for k in range(n):
        n_chars = int(rng.choice([1, 2, 3], p=n_chars_p))
        slots = _layout(n_chars, rng)
        me = int(rng.integers(n_chars))
        chars = tuple(Character(ident if i == me else sample_base_identity(rng), slot)
                      for i, slot in enumerate(slots))
        scene = Scene(chars, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], style)
        r = render(scene, seed=int(rng.integers(2**31)) + k)
        index = [c.identity for c in scene.ordered()].index(ident) if n_chars > 1 else 0
        # two equal identities in one scene would make the index ambiguous: base pool never holds ident
        # when ident is held out; for base identities, accept the first match.
        out.append((r, index))
    return out


def reference_renders(ident: Identity, n: int = 8, seed: int = 0) -> list[Rendered]:
    """Clean single-character renders of ``ident`` (middle slot, each background in turn, no style)."""
    out = []
    for k in range(n):
        scene = Scene((Character(ident, "middle"),), BACKGROUNDS[k % len(BACKGROUNDS)], "none")
        out.append(render(scene, seed=_seed_rng(seed, "reference", repr(ident)).integers(2**31) + k))
    return out


def replace(ident: Identity, **changes) -> Identity:
    """A copy of ``ident`` with some traits changed (validated)."""
    return dataclasses.replace(ident, **changes)
