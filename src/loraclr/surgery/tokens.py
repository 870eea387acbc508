"""Prompts, learned tokens and text encoding for SD1 / SD2 / SDXL pipelines.

Learned tokens (textual inversion, ED-LoRA) are added under new names that cannot collide between concepts:
``<elsa1>`` of concept ``alice`` becomes ``<alice-elsa1>``; an ED-LoRA layer-wise token becomes one vocabulary
entry per UNet cross-attention layer (``<alice-elsa1-l0>`` ...), and a multi-vector token becomes consecutive
entries (``<alice-elsa1> <alice-elsa1-v1> ...``). Prompts are written with the base name
(``<alice-elsa1>``) and expanded per layer by :meth:`TokenTable.expand`.

Cross-attention input ("encoder states"), as the diffusers pipelines compute it:
SD1 / SD2: the text encoder's last hidden state (after the final layer norm), (B, L, d_te);
SDXL: ``cat(te1.hidden_states[-2], te2.hidden_states[-2], dim=-1)``, (B, L, d_te1 + d_te2), plus the pooled
output of text_encoder_2 for the added time/text conditioning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loraclr.lora import LearnedToken

log = logging.getLogger(__name__)

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def text_components(pipe) -> list[tuple[str, object, object]]:
    """[(component, tokenizer, text_encoder)] present in the pipeline."""
    out = []
    for comp, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        te, tok = getattr(pipe, comp, None), getattr(pipe, tok_name, None)
        if te is not None and tok is not None:
            out.append((comp, tok, te))
    return out


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower()) or "t"


def _word_pattern(word: str) -> re.Pattern:
    # A token name is replaced only as a whole word: "<elsa1>" not inside "<elsa12>", "sks" not in "sksx".
    return re.compile(r"(?<![\w<>-])" + re.escape(word) + r"(?![\w<>-])")


@dataclass
class AddedToken:
    """A learned token of one concept, under its new name."""

    concept: str
    original: str  # name in the file ("<elsa1>")
    name: str  # base name in prompts ("<alice-elsa1>")
    n_vectors: int
    layerwise: bool
    embeddings: dict[str, Tensor]  # component -> (n_vectors, dim)

    def vocab(self) -> list[str]:
        """Every vocabulary entry the token needs, in the order of its embedding rows."""
        stem = self.name[:-1] if self.name.endswith(">") else self.name
        if self.layerwise:
            return [f"{stem}-l{i}>" for i in range(self.n_vectors)]
        return [self.name] + [f"{stem}-v{i}>" for i in range(1, self.n_vectors)]

    def text(self, layer: int | None) -> str:
        """What the base name stands for in a prompt (for cross-attention layer ``layer``)."""
        names = self.vocab()
        if self.layerwise:
            return names[layer if layer is not None else 0]
        return " ".join(names)


@dataclass
class TokenTable:
    """All added tokens of a merge; expands prompts written with base names."""

    tokens: list[AddedToken] = field(default_factory=list)
    n_layers: int = 0  # UNet cross-attention layers (length of layer-wise tokens)

    @property
    def layerwise(self) -> bool:
        return any(t.layerwise for t in self.tokens)

    def expand(self, text: str, layer: int | None = None) -> str:
        for t in self.tokens:
            text = _word_pattern(t.name).sub(t.text(layer), text)
        return text

    def variants(self, text: str) -> list[str]:
        """One prompt per cross-attention layer when ``text`` uses a layer-wise token, else ``[text]``."""
        if not any(t.layerwise and _word_pattern(t.name).search(text) for t in self.tokens):
            return [self.expand(text)]
        return [self.expand(text, layer) for layer in range(self.n_layers)]

    def uses_layerwise(self, text: str) -> bool:
        return any(t.layerwise and _word_pattern(t.name).search(text) for t in self.tokens)

    def rename(self, concept: str, text: str) -> str:
        """Replace a concept's original token names in ``text`` with their new base names."""
        for t in self.tokens:
            if t.concept == concept:
                text = _word_pattern(t.original).sub(t.name, text)
        return text

    def rewrite_originals(self, text: str) -> str:
        """Replace tokens written as their file names (a recipe's ``<rubo1>``) by their names in this model
        (``<rubo-rubo1>``); a name that several concepts share cannot be told apart and is refused."""
        owners: dict[str, set[str]] = {}
        for t in self.tokens:
            if t.original != t.name:
                owners.setdefault(t.original, set()).add(t.concept)
        for original, concepts in owners.items():
            pattern = _word_pattern(original)
            if not pattern.search(text):
                continue
            if len(concepts) > 1:
                raise ValueError(f"{original!r} is a token of several concepts ({', '.join(sorted(concepts))}); "
                                 "write {concept} or the merged token names instead")
            concept = next(iter(concepts))
            text = pattern.sub(lambda _m, c=concept, o=original: next(
                t.name for t in self.tokens if t.concept == c and t.original == o), text)
        return text

    def learned_tokens(self) -> list[LearnedToken]:
        """The added tokens as :class:`LearnedToken` (new names), for writing an embedding file."""
        return [LearnedToken(name=t.name, embeddings=dict(t.embeddings), layerwise=t.layerwise) for t in self.tokens]

    def to_json(self) -> list[dict]:
        return [
            {"concept": t.concept, "original": t.original, "name": t.name, "n_vectors": t.n_vectors,
             "layerwise": t.layerwise, "vocab": t.vocab()}
            for t in self.tokens
        ]


def plan_tokens(concept: str, tokens: list[LearnedToken], n_layers: int, source: str = "") -> list[AddedToken]:
    """New names for a concept's learned tokens (no model changes)."""
    out = []
    for tok in tokens:
        sizes = {comp: e.shape[0] for comp, e in tok.embeddings.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{source}: token {tok.name!r} has different vector counts per encoder: {sizes}")
        n = next(iter(sizes.values()))
        if tok.layerwise and n != n_layers:
            raise ValueError(
                f"{source}: layer-wise token {tok.name!r} has {n} embeddings but the base UNet has {n_layers} "
                "cross-attention layers; the LoRA was trained for another base model"
            )
        name = f"<{_slug(concept)}-{_slug(tok.name)}>"
        out.append(AddedToken(concept, tok.name, name, n, tok.layerwise, dict(tok.embeddings)))
    return out


def add_tokens(pipe, table: TokenTable) -> None:
    """Add every token of ``table`` to the pipeline's tokenizers and text-encoder embedding tables."""
    for comp, tok, te in text_components(pipe):
        new = [v for t in table.tokens for v in t.vocab()]
        if not new:
            continue
        clash = [v for v in new if v in tok.get_vocab()]
        if clash:
            raise ValueError(f"tokens {clash[:5]} already exist in the base model's tokenizer; rename the concepts")
        added = tok.add_tokens(new)
        if added != len(new):
            raise ValueError(f"{comp}: only {added} of {len(new)} new tokens could be added to the tokenizer")
        te.resize_token_embeddings(len(tok))
        table_w = te.get_input_embeddings().weight
        with torch.no_grad():
            for t in table.tokens:
                if comp not in t.embeddings:
                    raise ValueError(
                        f"concept {t.concept!r}: token {t.original!r} has no embedding for {comp} "
                        f"(it has {sorted(t.embeddings)}); the file is for another base model"
                    )
                emb = t.embeddings[comp]  # (n_vectors, dim)
                if emb.shape[1] != table_w.shape[1]:
                    raise ValueError(
                        f"concept {t.concept!r}: token {t.original!r} embedding width {emb.shape[1]} != "
                        f"{comp} width {table_w.shape[1]}; the file is for another base model"
                    )
                ids = tok.convert_tokens_to_ids(t.vocab())
                table_w[ids] = emb.to(table_w.dtype)


# --- encoding ----------------------------------------------------------------------------------------------


def token_ids(tokenizer, text: str, pad: bool) -> list[int]:
    kw = dict(padding="max_length") if pad else {}
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length, **kw).input_ids
    return list(ids)


@torch.no_grad()
def encode(pipe, texts: list[str], *, pad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Encoder states (B, L, D) and, for SDXL, pooled embeddings (B, P), as the pipeline computes them.

    pad=False encodes each text at its own length (B must be 1 per call then; lengths may differ).
    CLIP attention is causal, so the states of the unpadded positions do not depend on the padding.
    """
    comps = text_components(pipe)
    if not pad and len(texts) != 1:
        raise ValueError("unpadded encoding takes one text at a time")
    states, pooled = [], None
    for comp, tok, te in comps:
        device = te.get_input_embeddings().weight.device
        ids = torch.tensor([token_ids(tok, t, pad) for t in texts], device=device)
        if len(comps) == 1:
            states.append(te(ids)[0])  # last_hidden_state (SD1 / SD2)
        else:
            out = te(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if comp == "text_encoder_2":
                pooled = out[0]  # text_embeds of CLIPTextModelWithProjection
    lengths = {s.shape[1] for s in states}
    if len(lengths) != 1:
        raise ValueError(f"the tokenizers disagree on the length of {texts!r}: {sorted(lengths)}")
    return torch.cat(states, dim=-1), pooled


@torch.no_grad()
def encode_prompts(pipe, table: TokenTable, texts: list[str]) -> tuple[Tensor, Tensor | None, list[Tensor] | None]:
    """Encoder states (B, L, D), pooled (SDXL) or None, and, when a text uses a layer-wise token, the states
    of every cross-attention layer (each text expanded with that layer's vocabulary entries), else None."""
    states, pooled = encode(pipe, [table.expand(t) for t in texts], pad=True)
    per_layer = None
    if any(table.uses_layerwise(t) for t in texts):
        per_layer = [encode(pipe, [table.expand(t, layer) for t in texts], pad=True)[0]
                     for layer in range(table.n_layers)]
    return states, pooled, per_layer


def trigger_positions(tokenizer, prompt: str, trigger: str, *, where: str = "") -> list[int]:
    """Positions of the trigger's tokens in the (unpadded) tokenised prompt, plus the end-of-text position."""
    ids = token_ids(tokenizer, prompt, pad=False)
    trig = tokenizer(trigger, add_special_tokens=False).input_ids
    if not trig:
        raise ValueError(f"{where}: the trigger {trigger!r} tokenises to nothing")
    pos: set[int] = set()
    for s in range(len(ids) - len(trig) + 1):
        if ids[s : s + len(trig)] == trig:
            pos.update(range(s, s + len(trig)))
    if not pos:
        raise ValueError(
            f"{where}: the trigger {trigger!r} does not appear in the prompt {prompt!r} once tokenised "
            "(is it truncated, or spelled differently?); put the trigger in every prompt"
        )
    eos = tokenizer.eos_token_id
    eot = next((i for i in range(1, len(ids)) if ids[i] == eos), len(ids) - 1)
    return sorted(pos | {eot})
