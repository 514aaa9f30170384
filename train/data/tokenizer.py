"""Tokenizers: bytes (always available) and Hugging Face `tokenizers` files (optional).

The byte tokenizer maps text to its UTF-8 bytes (ids 0..255) and adds one special id,
end-of-document (256), so every machine can train without downloads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class ByteTokenizer:
    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read by the Hugging Face `tokenizers` package; EOS appended is
    the file's `eos_token` id if it names one, else a new id after the vocabulary."""

    def __init__(self, path: str, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ValueError(
                f"tokenizer={path!r} needs the Hugging Face `tokenizers` package: pip install tokenizers "
                "(or leave the tokenizer unset to use the built-in byte tokenizer)"
            ) from e
        self.name = path
        self._tok = Tokenizer.from_file(path)
        base = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(eos_token) if eos_token else None
        if eos_token and eos is None:
            raise ValueError(f"eos_token={eos_token!r} is not in the vocabulary of {path}")
        self.eos_id = base if eos is None else eos
        self.vocab_size = base + 1 if eos is None else base

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eos_id])


def load_tokenizer(path: str | None, eos_token: str | None = None):
    """Bytes (no path), a tokenizer.json, or a Hugging Face model folder: its tokenizer.json,
    with the end-of-document token its tokenizer_config.json names (unless eos_token is given)."""
    if not path:
        return ByteTokenizer()
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer={path!r} is a folder without tokenizer.json")
        config = folder / "tokenizer_config.json"
        if eos_token is None and config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos_token = eos.get("content") if isinstance(eos, dict) else eos
        tok = HFTokenizer(str(folder / "tokenizer.json"), eos_token)
        tok.name = path
        return tok
    return HFTokenizer(path, eos_token)
