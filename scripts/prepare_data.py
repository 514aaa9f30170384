"""Tokenize a folder of text / jsonl files into a memory-mapped token file for training.

    python -m scripts.prepare_data INPUT_DIR OUTPUT_DIR [--tokenizer tokenizer.json]

Every text file (--ext, default .txt .md .rst .py) is one document; every line of a
.jsonl file is one document (its --text-key field).  Each document ends with the
tokenizer's end-of-document id.  OUTPUT_DIR gets tokens.bin (raw, uint16 or uint32),
doc_offsets.npy (int64 [ndocs + 1]) and meta.json, which `data=tokens data.path=...` reads.
The default tokenizer is bytes; --tokenizer takes a Hugging Face `tokenizers` file or a model
folder holding tokenizer.json (the end-of-document token from its tokenizer_config.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from train.data.corpus import META_FILE, OFFSETS_FILE, TOKENS_FILE
from train.data.tokenizer import load_tokenizer


def documents(folder: Path, exts: tuple[str, ...], text_key: str):
    """Yield (source name, text) in sorted path order."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if text_key not in record:
                            raise ValueError(f"{path}:{lineno} has no {text_key!r} field; set --text-key")
                        yield f"{path}:{lineno}", record[text_key]
        elif path.suffix in exts:
            yield str(path), path.read_text(encoding="utf-8", errors="replace")


def prepare(input_dir: str, output_dir: str, tokenizer: str | None = None, eos_token: str | None = None,
            exts: tuple[str, ...] = (".txt", ".md", ".rst", ".py"), text_key: str = "text") -> dict:
    src, out = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise ValueError(f"input folder {input_dir!r} does not exist")
    tok = load_tokenizer(tokenizer, eos_token)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    with (out / TOKENS_FILE).open("wb") as f:
        for _, text in documents(src, exts, text_key):
            ids = np.append(tok.encode(text), tok.eos_id).astype(dtype)
            f.write(ids.tobytes())
            offsets.append(offsets[-1] + ids.size)
    if len(offsets) == 1:
        raise ValueError(f"no documents found in {input_dir!r} (extensions {', '.join(exts)} and .jsonl)")
    np.save(out / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    meta = {"vocab_size": tok.vocab_size, "eos_id": int(tok.eos_id), "dtype": np.dtype(dtype).name,
            "tokenizer": tok.name, "num_docs": len(offsets) - 1, "num_tokens": offsets[-1]}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input_dir")
    ap.add_argument("output_dir")
    ap.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer.json, or a model folder holding one "
                    "(its tokenizer_config.json names the end-of-document token); needs `pip install tokenizers`")
    ap.add_argument("--eos-token", default=None, help="the tokenizer's end-of-document token (default: a new id)")
    ap.add_argument("--ext", nargs="+", default=[".txt", ".md", ".rst", ".py"], help="text file suffixes")
    ap.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    args = ap.parse_args(argv)
    meta = prepare(args.input_dir, args.output_dir, args.tokenizer, args.eos_token, tuple(args.ext), args.text_key)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
