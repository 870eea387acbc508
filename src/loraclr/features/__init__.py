"""Feature collection: per-layer inputs X_i of every concept, in the paper's order (:mod:`loraclr.merging`).

The recording hooks live here; the hooks and token tables that change the model (LoRAs applied, learned
tokens, layer-wise states) are model surgery (:mod:`loraclr.surgery`), shared with generation and training
and re-exported here for convenience. Everything collected is plain tensors handed to the merge methods as
:class:`loraclr.merge.api.LayerProblem`.
"""

from loraclr.features.collect import (
    ConceptFeaturesInput,
    FeatureStore,
    StageFeatures,
    collect_cross_attention,
    collect_spatial,
    collect_text_encoder,
    conditioning,
    cross_attention_keys,
    native_resolution,
    sample_latents,
    spatial_keys,
    spill_directory,
)
from loraclr.features.hooks import InputCapture, RowRecorder, module_rows
from loraclr.surgery.hooks import apply_layers, layerwise_states
from loraclr.surgery.tokens import AddedToken, TokenTable, add_tokens, encode, plan_tokens, trigger_positions

__all__ = [
    "AddedToken", "ConceptFeaturesInput", "FeatureStore", "InputCapture", "RowRecorder",
    "StageFeatures", "TokenTable", "add_tokens", "apply_layers", "collect_cross_attention", "collect_spatial",
    "collect_text_encoder", "conditioning", "cross_attention_keys", "encode", "layerwise_states", "module_rows",
    "native_resolution", "plan_tokens", "sample_latents", "spatial_keys", "spill_directory", "trigger_positions",
]
