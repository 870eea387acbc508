"""The scene generator: determinism, captions that describe what is drawn, layouts, held-out concepts."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from loraclr.world import scenes as S


def _scene(*chars, bg="room", style="none"):
    return S.Scene(tuple(S.Character(i, slot) for i, slot in chars), bg, style)


RED = S.Identity("round", "red")
BLUE = S.Identity("tall", "blue", "stripes", "white", "one eye", "a hat")
GREEN = S.Identity("square", "green", face="glasses", accessory="a crown")


def test_same_seed_same_pixels_caption_boxes():
    scene = _scene((RED, "left"), (BLUE, "right"), bg="beach")
    a, b = S.render(scene, seed=7), S.render(scene, seed=7)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    np.testing.assert_array_equal(a.image, b.image)
    assert a.caption == b.caption and a.boxes == b.boxes
    c = S.render(scene, seed=8)
    assert not np.array_equal(a.image, c.image)  # the seed moves things


def test_samplers_are_deterministic():
    s1 = [S.sample_base_scene(np.random.default_rng(3)) for _ in range(2)]
    assert s1[0] == s1[1]
    r1 = S.identity_samples(S.concept("rubo"), 5, seed=1)
    r2 = S.identity_samples(S.concept("rubo"), 5, seed=1)
    for (a, i), (b, j) in zip(r1, r2, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert i == j


def test_caption_words():
    assert S.caption_identity(RED) == "a round red creature with two eyes"
    assert S.caption_identity(BLUE) == "a tall blue creature with white stripes, one eye and a hat"
    r = S.render(_scene((RED, "left"), (GREEN, "middle"), (BLUE, "right"), bg="snow", style="pastel"))
    assert r.caption == (
        "a round red creature with two eyes on the left, "
        "a square green creature with glasses and a crown in the middle and "
        "a tall blue creature with white stripes, one eye and a hat on the right in the snow, in pastel style"
    )
    assert r.character_phrases == [S.caption_identity(i) for i in (RED, GREEN, BLUE)]


def _colour_fraction(image, box, rgb, tol=40):
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1].astype(int)
    return float((np.abs(crop - np.array(rgb)).max(axis=2) < tol).mean())


def test_boxes_hold_the_body_colour_the_caption_names():
    rng = np.random.default_rng(0)
    for k in range(60):
        scene = S.sample_base_scene(rng, styled=0.0)
        r = S.render(scene, seed=k)
        for c, box, phrase in zip(scene.ordered(), r.boxes, r.character_phrases, strict=True):
            assert f" {c.identity.colour} creature" in phrase and phrase in r.caption
            rgb = S.COLOURS[c.identity.colour]
            own = _colour_fraction(r.image, box, rgb)
            outside = np.ones((64, 64), bool)
            for x0, y0, x1, y1 in r.boxes:
                outside[y0:y1, x0:x1] = False
            near = np.abs(r.image.astype(int) - np.array(rgb)).max(axis=2) < 40
            bg = near[outside].mean()  # e.g. a white creature on snow: the colour is everywhere
            assert own > 0.02 and (own > 2 * bg or bg > 0.2), (r.caption, box, own)
            if c.identity.pattern != "plain":  # body + pattern colours fill a good part of the box
                own += _colour_fraction(r.image, box, S.COLOURS[c.identity.pattern_colour])
            assert own > 0.08, (r.caption, box, own)


def test_layout_matches_caption_positions():
    rng = np.random.default_rng(1)
    for k in range(60):
        scene = S.sample_base_scene(rng)
        r = S.render(scene, seed=k)
        centres = [(b[0] + b[2]) / 2 for b in r.boxes]
        assert centres == sorted(centres)
        slots = [c.slot for c in scene.ordered()]
        for slot, cx in zip(slots, centres, strict=True):
            if slot == "left":
                assert cx < 28
                assert re.search(r"on the left", r.caption)
            elif slot == "right":
                assert cx > 36
                assert "on the right" in r.caption
            else:
                assert 24 < cx < 40
        if len(slots) > 1:  # characters do not overlap much
            for a, b in itertools.pairwise(r.boxes):
                assert a[2] <= b[0] + 3


def test_styles_change_pixels_and_caption():
    scene = _scene((RED, "middle"), bg="city")
    plain = S.render(scene, seed=0)
    for style in S.STYLES[1:]:
        r = S.render(S.Scene(scene.characters, "city", style), seed=0)
        assert r.caption.startswith(plain.caption + ", ")
        assert np.abs(r.image.astype(int) - plain.image).mean() > 5
    grey = S.render(S.Scene(scene.characters, "city", "grayscale"), seed=0).image.astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1


def test_held_out_identities_and_styles_never_in_base_training():
    rng = np.random.default_rng(123)
    for _ in range(3000):
        scene = S.sample_base_scene(rng)
        assert scene.style not in S.HELD_OUT_STYLES
        for c in scene.characters:
            assert not S.is_held_out(c.identity)
    # and the held-out identities are reachable combinations (a uniform sampler would draw them)
    for ident in S.CONCEPTS.values():
        assert S.Identity(**vars(ident)) == ident


def test_concepts_are_many_and_close():
    names = list(S.CONCEPTS)
    assert len(names) >= 14 and all(len(n) <= 6 for n in names)
    assert len(set(S.CONCEPTS.values())) == len(names)
    fields = ("shape", "colour", "pattern", "pattern_colour", "face", "accessory")
    for a, b in itertools.combinations(S.CONCEPTS.values(), 2):
        assert sum(getattr(a, f) != getattr(b, f) for f in fields) >= 2  # never one trait apart
    for name, ident in S.CONCEPTS.items():
        # a look-alike: another concept with the same shape and colour
        twins = [n for n, o in S.CONCEPTS.items() if n != name and (o.shape, o.colour) == (ident.shape, ident.colour)]
        same_colour = [n for n, o in S.CONCEPTS.items() if n != name and o.colour == ident.colour]
        same_shape = [n for n, o in S.CONCEPTS.items() if n != name and o.shape == ident.shape]
        assert twins or (same_colour and same_shape), name


def test_identity_samples_place_the_identity_once():
    ident = S.concept("tavi")
    out = S.identity_samples(ident, 40, seed=0)
    counts = {1: 0, 2: 0, 3: 0}
    slots = set()
    for r, i in out:
        ids = [c.identity for c in r.scene.ordered()]
        assert ids[i] == ident and ids.count(ident) == 1
        assert r.character_phrases[i] == S.caption_identity(ident) and r.character_phrases[i] in r.caption
        assert all(not S.is_held_out(o) for j, o in enumerate(ids) if j != i)
        counts[len(ids)] += 1
        slots.add(r.scene.ordered()[i].slot)
        assert _colour_fraction(r.image, r.boxes[i], S.COLOURS["blue"]) > 0.05
    assert min(counts.values()) > 0 and slots == {"left", "middle", "right"}


def test_reference_renders():
    refs = S.reference_renders(S.concept("gilu"), n=6, seed=0)
    assert len(refs) == 6
    assert {r.scene.background for r in refs} == set(S.BACKGROUNDS)
    for r in refs:
        assert len(r.boxes) == 1 and r.character_phrases == [S.caption_identity(S.concept("gilu"))]


def test_invalid_specs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="colour"):
        S.Identity("round", "teal")
    with pytest.raises(ValueError, match="pattern_colour"):
        S.Identity("round", "red", "stripes", "red")
    with pytest.raises(ValueError, match="slots"):
        _scene((RED, "middle"), (BLUE, "right"))
    with pytest.raises(KeyError, match="known"):
        S.concept("nobody")
