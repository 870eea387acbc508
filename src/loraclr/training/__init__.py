"""Concept LoRA training (``loraclr train-lora``): DreamBooth-LoRA, ED-LoRA and textual-inversion styles."""

from loraclr.training.data import (
    ConceptData,
    folder_data,
    pick_trigger,
    world_identity_data,
    world_style_data,
)
from loraclr.training.save import save_edlora, save_trained
from loraclr.training.trainer import TrainConfig, TrainResult, denoising_loss, lora_targets, train_lora

__all__ = [
    "ConceptData", "TrainConfig", "TrainResult", "denoising_loss", "folder_data", "lora_targets", "pick_trigger", "save_edlora",
    "save_trained", "train_lora", "world_identity_data", "world_style_data",
]
