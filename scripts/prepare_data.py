"""Tokenize a folder of text / jsonl files into a memory-mapped token file for training.

    python -m scripts.prepare_data INPUT_DIR OUTPUT_DIR [--tokenizer tokenizer.json]

Every text file (--ext, default .txt .md .rst .py) is one document; every line of a
.jsonl file is one document (its --text-key field).  Each document ends with the
tokenizer's end-of-document id.  OUTPUT_DIR gets tokens.bin (raw, uint16 or uint32),
doc_offsets.npy (int64 [ndocs + 1]) and meta.json, which `data=tokens data.path=...` reads.
The default tokenizer is bytes; --tokenizer takes a Hugging Face `tokenizers` file or a model
folder holding tokenizer.json (the end-of-document token from its tokenizer_config.json).

Bad input stops the run with a ValueError naming the file (and line): a .jsonl line that
is not a JSON object with a string --text-key field, a text file that is not UTF-8 or holds
NUL bytes (binary data), a folder with no documents. The output is written into a hidden
temporary folder beside OUTPUT_DIR and renamed into place at the end, so a failed run
leaves no output and a previous one untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from train.data.corpus import META_FILE, OFFSETS_FILE, TOKENS_FILE
from train.data.tokenizer import load_tokenizer


def read_text(path: Path) -> str:
    """The file's text; ValueError when it is not text (not UTF-8, or NUL bytes)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): binary or "
                         f"another encoding; convert it to UTF-8, remove it, or drop its suffix from --ext") from None
    if "\0" in text:
        raise ValueError(f"{path} holds NUL bytes at offset {text.index(chr(0))}: binary data, not text; "
                         f"remove it or drop its suffix from --ext")
    return text


def jsonl_documents(path: Path, text_key: str):
    text = read_text(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); every line of a .jsonl "
                             f"file must be one JSON object") from None
        if not isinstance(record, dict) or text_key not in record:
            raise ValueError(f"{where} has no {text_key!r} field; set --text-key to the field holding the text")
        if not isinstance(record[text_key], str):
            raise ValueError(f"{where}: field {text_key!r} is {type(record[text_key]).__name__}, not a string")
        yield where, record[text_key]


def documents(folder: Path, exts: tuple[str, ...], text_key: str):
    """Yield (source name, text) in sorted path order."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".jsonl":
            yield from jsonl_documents(path, text_key)
        elif path.suffix in exts:
            yield str(path), read_text(path)


def prepare(input_dir: str, output_dir: str, tokenizer: str | None = None, eos_token: str | None = None,
            exts: tuple[str, ...] = (".txt", ".md", ".rst", ".py"), text_key: str = "text") -> dict:
    src, out = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise ValueError(f"input folder {input_dir!r} does not exist")
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise ValueError(f"output folder {output_dir!r} exists and is not a prepared token folder (no {META_FILE}); "
                         f"choose a new or empty folder")
    tok = load_tokenizer(tokenizer, eos_token)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write(src, tmp, tok, dtype, exts, text_key)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _write(src: Path, out: Path, tok, dtype, exts, text_key) -> dict:
    offsets = [0]
    with (out / TOKENS_FILE).open("wb") as f:
        for _, text in documents(src, exts, text_key):
            ids = np.append(tok.encode(text), tok.eos_id).astype(dtype)
            f.write(ids.tobytes())
            offsets.append(offsets[-1] + ids.size)
    if len(offsets) == 1:
        files = sum(1 for p in src.rglob("*") if p.is_file())
        raise ValueError(f"no documents found in {str(src)!r}: it holds {files} file(s), none of them .jsonl or "
                         f"{', '.join(exts)} (set --ext for other text suffixes)")
    np.save(out / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    meta = {"vocab_size": tok.vocab_size, "eos_id": int(tok.eos_id), "dtype": np.dtype(dtype).name,
            "tokenizer": tok.name, "num_docs": len(offsets) - 1, "num_tokens": offsets[-1]}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _replace(new: Path, out: Path) -> None:
    """Rename the finished folder to out; a previous prepared folder there is set aside first
    and deleted after, so out always holds one whole result."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


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
    try:
        meta = prepare(args.input_dir, args.output_dir, args.tokenizer, args.eos_token, tuple(args.ext), args.text_key)
    except ValueError as e:
        raise SystemExit(f"prepare_data: {e}") from None
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
