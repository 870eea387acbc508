"""loraclr: merge many concept LoRAs of Stable Diffusion into one model (LoRACLR, arXiv 2412.09622)."""

__version__ = "0.1.0"
