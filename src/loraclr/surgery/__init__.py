"""Model surgery: what changes a pipeline's vocabulary or its forward pass, shared by generation, training and
the merge. :mod:`~loraclr.surgery.tokens`: learned tokens added under per-concept names, prompts encoded
(per layer for ED-LoRA tokens); :mod:`~loraclr.surgery.hooks`: LoRA deltas applied through forward hooks,
per-layer cross-attention states. Nothing here records features (:mod:`loraclr.features`) or merges."""
