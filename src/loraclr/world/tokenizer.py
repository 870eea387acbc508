"""The real CLIP BPE tokenizer of Stable Diffusion, rebuilt offline.

The vocabulary of OpenAI's CLIP (and so of SD 1.x / SDXL) is the file ``bpe_simple_vocab_16e6.txt.gz`` that
ships inside the ``open_clip_torch`` wheel. This module turns it into a ``transformers.CLIPTokenizer`` and
saves it as an ordinary tokenizer folder, so no model hub is needed. The committed folder
``assets/mini-sd/tokenizer`` (the built-in model's tokenizer, the only copy shipped) was made with
``python -m loraclr.world.tokenizer BPE_GZ OUT_DIR``.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from transformers import CLIPTokenizer

ASSETS = Path(__file__).parent / "assets"
# one copy, inside the built-in pipeline folder (a second one beside it cost 1.5 MB of the 40 MB budget);
# save_pipeline_folder copies it into every pipeline it writes, the built-in one included
TOKENIZER_DIR = ASSETS / "mini-sd" / "tokenizer"

# CLIP keeps the first 49152 - 256 - 2 merges of the file (its SimpleTokenizer does the same slice).
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_clip_tokenizer(bpe_gz: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Build SD's CLIP tokenizer from the BPE merges file of OpenAI CLIP."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _N_MERGES + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tokenizer_folder(path: str | Path = TOKENIZER_DIR) -> Path:
    """``path`` if it holds a tokenizer, else an error that says how to rebuild the committed one offline."""
    path = Path(path)
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path} (vocab.json missing); rebuild SD's CLIP tokenizer offline with "
            "`python -m loraclr.world.tokenizer <open_clip_torch's bpe_simple_vocab_16e6.txt.gz> "
            f"{TOKENIZER_DIR}`"
        )
    return path


def load_tokenizer(path: str | Path = TOKENIZER_DIR) -> CLIPTokenizer:
    """The committed SD tokenizer (or any tokenizer folder)."""
    return CLIPTokenizer.from_pretrained(str(tokenizer_folder(path)))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m loraclr.world.tokenizer BPE_GZ OUT_DIR")
    tok = build_clip_tokenizer(args[0])
    ids = tok("a photo of sks man").input_ids
    # SD 1.5's tokenizer gives exactly these ids; refuse to save anything else.
    expected = [49406, 320, 1125, 539, 48136, 786, 49407]
    if ids != expected:
        raise SystemExit(f"tokenizer check failed: {ids} != {expected}")
    save_tokenizer(tok, args[1])


def save_tokenizer(tok: CLIPTokenizer, out_dir: str | Path) -> None:
    """Save as SD ships it: vocab.json + merges.txt (readable by transformers 4.x and 5.x alike)."""
    import json

    out = Path(out_dir)
    tok.save_pretrained(str(out))
    model = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (out / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    # tokenizer.json would duplicate the two files above (3.6 MB); the slow-format pair is enough.
    (out / "tokenizer.json").unlink()


if __name__ == "__main__":
    main()
