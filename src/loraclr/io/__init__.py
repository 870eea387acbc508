"""LoRA and embedding files: readers, writers, checkpoints (see DESIGN.md §4)."""

from loraclr.io.embeddings import load_embeddings, save_embeddings
from loraclr.io.read import ReadReport, load_lora, read_lora
from loraclr.io.write import factorize, save_lora

__all__ = ["ReadReport", "factorize", "load_embeddings", "load_lora", "read_lora", "save_embeddings", "save_lora"]
