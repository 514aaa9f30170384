"""What a workload is made of: document lengths, the sequences they are packed into, and
the mask of a benchmark cell.

Document lengths come from a JSON list of positive ints.  Every command that needs them
(`data=synthetic`, `scripts.bench_cp`, `scripts.simulate_cp`, `scripts/bench_cad.py`)
resolves the file with `doclens_path`: the command's own setting, else the
`LONGCTX_DOCLENS` environment variable (an empty value counts as unset), else the ProLong
mix shipped inside this package (`doclens_prolong.json`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kernels import MaskSpec

MASK_KINDS = ("causal", "document", "window", "document+window", "full")
DOCLENS_ENV = "LONGCTX_DOCLENS"
PACKAGED_DOCLENS = Path(__file__).with_name("doclens_prolong.json")


def doclens_path(explicit: str | os.PathLike | None, setting: str) -> tuple[Path, str]:
    """(file, where it came from) by the one rule: `explicit` > $LONGCTX_DOCLENS > packaged."""
    if explicit:
        return Path(explicit), setting
    if os.environ.get(DOCLENS_ENV):
        return Path(os.environ[DOCLENS_ENV]), f"${DOCLENS_ENV}"
    return PACKAGED_DOCLENS, "the packaged default"


def load_doclens(explicit: str | os.PathLike | None = None, setting: str = "--doclens") -> list[int]:
    """The document lengths `doclens_path` resolves to; a bad file raises ValueError naming
    the file, the setting and the environment variable."""
    path, source = doclens_path(explicit, setting)
    fix = f"set {setting}=FILE or {DOCLENS_ENV}=FILE to a JSON list of document lengths (unset both for the default)"
    where = f"document lengths {str(path)!r} (from {source})"
    if not path.exists():
        raise ValueError(f"{where} do not exist; {fix}")
    if not path.is_file():
        raise ValueError(f"{where} is not a file; {fix}")
    try:
        lens = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e}); {fix}") from None
    if not isinstance(lens, list) or not lens or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lens):
        raise ValueError(f"{where} must be a non-empty JSON list of positive ints; {fix}")
    return lens


def fill(tokens: int, draw) -> list[int]:
    """One packed sequence of exactly `tokens` tokens: document lengths from `draw()` until
    it is full, the last document cut at the sequence end (how packed batches are built)."""
    lens, left = [], tokens
    while left > 0:
        n = min(draw(), left)
        lens.append(n)
        left -= n
    return lens


def make_mask(cell: dict) -> MaskSpec:
    """The mask of a benchmark cell or record: its `mask` kind over `seqlen` tokens, with its
    `window` and `doc_lens` where the kind has them ("window" is a sliding window alone)."""
    kind = cell["mask"]
    if kind not in MASK_KINDS:
        raise ValueError(f"mask={kind!r} is unknown; choose one of {', '.join(MASK_KINDS)}")
    window = cell["window"] if "window" in kind else None
    if "document" in kind:
        return MaskSpec.from_doc_lens(cell["doc_lens"], causal=True, window=window)
    return MaskSpec(causal=kind != "full", window=window)
