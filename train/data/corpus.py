"""Document sources.  A corpus is a numbered list of documents of known length:
`lengths` (int64 [ndocs], EOS included), `read(i)` -> int64 tokens, `vocab_size`.

- StdlibCorpus: the text files of the installed Python standard library, one file per
  document, byte-tokenized; real text of real, variable lengths on every machine.
- TokenFileCorpus: a folder written by scripts/prepare_data.py (memory-mapped tokens +
  document offsets), any tokenizer.
- SyntheticCorpus: random tokens with document lengths drawn from a given distribution
  (a JSON list of lengths, scaled to the run's context), for benchmarking workloads.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np

from parallel.perf.workload import load_doclens

from .tokenizer import ByteTokenizer

TOKENS_FILE, OFFSETS_FILE, META_FILE = "tokens.bin", "doc_offsets.npy", "meta.json"


class StdlibCorpus:
    def __init__(self, root: str | None = None, suffixes=(".py",)):
        root = Path(root or sysconfig.get_paths()["stdlib"])
        files = sorted(
            p for p in root.rglob("*")
            if p.suffix in suffixes and p.is_file()
            and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)
        )
        sizes = np.array([p.stat().st_size for p in files], dtype=np.int64)
        keep = sizes > 0
        self.files = [p for p, k in zip(files, keep) if k]
        if not self.files:
            raise ValueError(f"data.source=stdlib found no {'/'.join(suffixes)} files under {root}; "
                             "set data.path=<folder of .py files>")
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.lengths = sizes[keep] + 1

    def read(self, i: int) -> np.ndarray:
        data = self.files[i].read_bytes()
        if len(data) + 1 != self.lengths[i]:
            raise ValueError(f"{self.files[i]} changed size while training ({len(data)} bytes, expected {self.lengths[i] - 1})")
        return np.append(self.tokenizer.encode(data), self.tokenizer.eos_id)


class TokenFileCorpus:
    def __init__(self, path: str):
        folder = Path(path)
        if not (folder / META_FILE).is_file():
            raise ValueError(f"data.path={path!r} has no {META_FILE}; write it with scripts/prepare_data.py")
        self.meta = json.loads((folder / META_FILE).read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokens = np.memmap(folder / TOKENS_FILE, dtype=self.meta["dtype"], mode="r")
        self.offsets = np.load(folder / OFFSETS_FILE)
        self.lengths = np.diff(self.offsets)

    def read(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)


class SyntheticCorpus:
    """`num_docs` documents whose lengths are drawn (seeded) from a JSON list of document
    lengths scaled by seqlen / context; each document's tokens are uniform in [0, vocab_size).
    `doclens_path` None: $LONGCTX_DOCLENS, else the packaged ProLong mix
    (`parallel.perf.workload.load_doclens`)."""

    def __init__(self, doclens_path: str | None, seqlen: int, context: int, vocab_size: int, seed: int, num_docs: int):
        source = np.asarray(load_doclens(doclens_path, "data.doclens"), dtype=np.float64)
        drawn = np.random.default_rng([seed, 1]).choice(source, size=num_docs)
        self.lengths = np.maximum(1, np.round(drawn * seqlen / context)).astype(np.int64)
        self.vocab_size, self.seed = vocab_size, seed

    def read(self, i: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, i]).integers(0, self.vocab_size, int(self.lengths[i]))

