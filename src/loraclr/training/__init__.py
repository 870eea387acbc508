"""Concept LoRA training (``loraclr train-lora``): DreamBooth-LoRA, ED-LoRA and textual-inversion styles.

    loraclr train-lora --images DIR --base BASE -o concept.safetensors --trigger sks   # kohya file
    loraclr train-lora --world-identity rubo -o rubo.safetensors --prior 64           # built-in world
    loraclr train-lora --world-identity ruzi --edlora -o ruzi.pth                     # Mix-of-Show ED-LoRA
    loraclr train-lora --world-style mosaic --format diffusers -o mosaic.safetensors

Library: ``data = world_identity_data(...)`` / ``folder_data(...)``; ``result = train_lora(pipe, data,
TrainConfig(...))``; ``save_trained(result, path, format=...)``. ``scripts/train_concepts.py`` trains the
world's whole concept set.
"""

from loraclr.training.data import (
    ConceptData,
    folder_data,
    pick_trigger,
    world_identity_data,
    world_style_data,
)
from loraclr.training.save import check_save_path, save_edlora, save_trained, snapshot_path
from loraclr.training.trainer import TrainConfig, TrainResult, denoising_loss, lora_targets, train_lora

__all__ = [
    "ConceptData", "TrainConfig", "TrainResult", "check_save_path", "denoising_loss", "folder_data", "lora_targets", "pick_trigger", "save_edlora",
    "save_trained", "snapshot_path", "train_lora", "world_identity_data", "world_style_data",
]
