"""Old path of :mod:`loraclr.surgery.tokens` (token tables and prompt encoding are model surgery, not feature
collection), kept for code that still imports it from here (loraclr.regional, its tests, scripts)."""

from loraclr.surgery.tokens import (
    TEXT_COMPONENTS,
    AddedToken,
    TokenTable,
    add_tokens,
    encode,
    is_sdxl,
    plan_tokens,
    text_components,
    token_ids,
    trigger_positions,
)

__all__ = ["TEXT_COMPONENTS", "AddedToken", "TokenTable", "add_tokens", "encode", "is_sdxl", "plan_tokens",
           "text_components", "token_ids", "trigger_positions"]
