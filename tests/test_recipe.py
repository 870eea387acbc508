"""Recipes: YAML and the official concept JSON list, validation errors that name the field, overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraclr.recipe import DEFAULT_PROMPTS, dump_recipe, load_recipe, recipe_from_dict


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_defaults_and_relative_paths(tmp_path):
    p = _write(tmp_path, """
base: models/base
concepts:
  - name: alice
    lora: loras/alice.safetensors
    trigger: sks woman
  - lora: loras/bob.safetensors
    trigger: zwx man
    unet_strength: 1.5
    prompts: ["a portrait of {trigger}"]
""")
    r = load_recipe(p)
    assert r.base.path == str((tmp_path / "models/base").resolve())
    assert r.concepts[0].lora == str((tmp_path / "loras/alice.safetensors").resolve())
    assert r.concepts[0].prompt_templates == DEFAULT_PROMPTS == ("photo of a {trigger}", "{trigger}")
    assert r.concepts[1].name == "zwx-man"  # from the trigger when no name is given
    assert r.concepts[1].unet_strength == 1.5 and r.concepts[1].text_encoder_strength == 1.0
    assert r.concepts[1].prompt_templates == ("a portrait of {trigger}",)
    # no method named: loraclr with the preset the quality benchmark found best
    assert r.method.name == "loraclr" and r.method.settings == {}
    assert r.method.resolved == {"mode": "converged", "anchor": "mean", "ridge": 0.1}
    assert r.features.steps == 5 and r.features.spatial_prompts == 2  # the session-12 feature run
    assert r.features.max_rows == 2048 and r.features.precision == "auto"
    assert r.features.resolution is None and r.features.max_resolution == 256
    assert r.output.lora_formats == ("kohya", "diffusers")


def test_method_mapping_and_mini(tmp_path):
    p = _write(tmp_path, """
base: mini
method: {name: loraclr, mode: paper, margin: 0.25}
concepts: [{lora: a.safetensors, trigger: sks}]
features: {steps: 4, resolution: 64, precision: bfloat16, gram: true}
output: {rank: 16, lora_formats: kohya}
""")
    r = load_recipe(p)
    assert r.base.path == "mini" and r.base.is_mini
    assert r.method.name == "loraclr" and r.method.settings == {"mode": "paper", "margin": 0.25}
    assert (r.features.steps, r.features.resolution, r.features.precision, r.features.gram) == (4, 64, "bfloat16", True)
    assert r.output.rank == 16 and r.output.lora_formats == ("kohya",)


def test_official_concept_json(tmp_path):
    items = [
        {"lora_path": "elsa.pth", "unet_alpha": 1.5, "text_encoder_alpha": 1.5, "concept_name": "<elsa1> <elsa2>"},
        {"lora_path": "/abs/moana.pth", "unet_alpha": 1.0, "text_encoder_alpha": 0.5, "concept_name": "<moana1> <moana2>"},
    ]
    p = _write(tmp_path, json.dumps(items), "config.json")
    with pytest.raises(ValueError, match="field 'base' is missing"):
        load_recipe(p)
    r = load_recipe(p, base="mini")
    assert [c.trigger for c in r.concepts] == ["<elsa1> <elsa2>", "<moana1> <moana2>"]
    assert [c.name for c in r.concepts] == ["elsa1-elsa2", "moana1-moana2"]
    assert r.concepts[0].lora == str((tmp_path / "elsa.pth").resolve())
    assert r.concepts[1].lora == "/abs/moana.pth"
    assert (r.concepts[0].unet_strength, r.concepts[1].text_encoder_strength) == (1.5, 0.5)
    assert r.allow_pickle  # official ED-LoRA files are pickles


@pytest.mark.parametrize(
    "text, match",
    [
        ("base: b\nconcepts: []\n", "field 'concepts' is empty"),
        ("base: b\n", "field 'concepts' is missing"),
        ("base: b\nconcept: []\n", r"unknown field\(s\) \['concept'\]"),
        ("base: b\nconcepts: [{lora: a, trigger: x, strenght: 1}]\n", r"concepts\[0\]: unknown field\(s\) \['strenght'\]"),
        ("base: b\nconcepts: [{trigger: x}]\n", r"concepts\[0\]: field 'lora' is missing"),
        ("base: b\nconcepts: [{lora: a, unet_strength: high}]\n", "field 'unet_strength' must be a number"),
        ("base: b\nconcepts: [{lora: a, name: x}, {lora: b, name: x}]\n", "duplicate names"),
        ("base: b\nconcepts: [{lora: a}]\nfeatures: {steps: 0}\n", "features.steps must be >= 1"),
        ("base: b\nconcepts: [{lora: a}]\nfeatures: {precision: fp8}\n", "features.precision must be one of"),
        ("base: b\nconcepts: [{lora: a}]\nfeatures: {max_resolution: 0}\n", "features.max_resolution must be"),
        ("base: b\nconcepts: [{lora: a}]\noutput: {lora_formats: [ckpt]}\n", "output.lora_formats: unknown"),
        ("base: b\nconcepts: [{lora: a, trigger: sks, prompts: ['a dog']}]\n", "contains neither"),
        ("base: b\nconcepts: [{lora: a}]\nmethod: {mode: paper}\n", "method: field 'name' is missing"),
        ("base: b\nconcepts: {lora: a}\n", "field 'concepts' must be a list"),
        ("base: [b\n", "not valid YAML"),
    ],
)
def test_errors_name_file_and_field(tmp_path, text, match):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as e:
        load_recipe(p)
    assert str(p) in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_replace_overrides_and_round_trip(tmp_path):
    p = _write(tmp_path, "base: b\nconcepts: [{lora: a, trigger: sks}]\nmethod: {name: loraclr, mode: paper}\n")
    r = load_recipe(p)
    r2 = r.replace(**{"features.steps": 3, "output.rank": 4, "method.margin": 0.1, "features.seed": None})
    assert r2.features.steps == 3 and r2.output.rank == 4 and r2.features.seed == r.features.seed
    assert r2.method.settings == {"mode": "paper", "margin": 0.1}
    assert r.features.steps == 5  # frozen original untouched
    with pytest.raises(ValueError, match="features.steps must be >= 1"):
        r.replace(**{"features.steps": 0})
    # the resolved recipe written beside outputs reads back to the same recipe
    again = recipe_from_dict(__import__("yaml").safe_load(dump_recipe(r2)), source="x", root=tmp_path)
    assert again.to_dict() == r2.to_dict()


def test_recommended_preset_only_when_no_mode_is_named(tmp_path):
    from loraclr.recipe import RECOMMENDED

    p = _write(tmp_path, "base: b\nconcepts: [{lora: a, trigger: sks}]\nmethod: {name: loraclr, margin: 0.25}\n")
    assert load_recipe(p).method.resolved == {**RECOMMENDED["loraclr"], "margin": 0.25}
    p = _write(tmp_path, "base: b\nconcepts: [{lora: a, trigger: sks}]\nmethod: {name: loraclr, mode: converged}\n")
    assert load_recipe(p).method.resolved == {"mode": "converged"}  # an explicit mode: the official objective
    p = _write(tmp_path, "base: b\nconcepts: [{lora: a, trigger: sks}]\nmethod: lstsq\n")
    assert load_recipe(p).method.resolved == {}


def test_cli_mode_replaces_the_preset(tmp_path):
    import argparse

    from loraclr.commands.merge import build_recipe
    from loraclr.merge.methods import make_config

    p = _write(tmp_path, "base: b\nconcepts: [{lora: a, trigger: sks}]\n")
    args = argparse.Namespace(recipe=str(p), base=None, base_config=None, set=[], mode="paper", method=None,
                              rank=None, steps=None, resolution=None, seed=None, precision=None, max_rows=None,
                              allow_pickle=None)
    r = build_recipe(args)
    assert r.method.resolved == {"mode": "paper"}
    assert make_config("loraclr", **r.method.resolved).ridge == 0.0  # paper mode accepts it: no preset ridge left
