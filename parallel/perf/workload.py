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

from kernels import HeadStride, MaskSpec

MASK_KINDS = ("causal", "document", "window", "document+window", "full", "prefix", "sink", "s2")
PREFIX = 2048      # "prefix": tokens of the bidirectional prefix (a cell's `prefix` overrides)
SINK = 4           # "sink": sink tokens in front of the window (a cell's `sink` overrides)
S2 = dict(block=64, local_blocks=16, vert_stride=8, dense_heads=0)  # "s2": HeadStride, S2-Attention's
                                                                    # layout (a cell's `s2` dict overrides)
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


def s2_heads(overrides: dict | None = None) -> HeadStride:
    """The "s2" kind's `HeadStride`: S2's defaults with `overrides` (HeadStride fields)."""
    unknown = sorted(set(overrides or {}) - set(S2))
    if unknown:
        raise ValueError(f"s2 setting(s) {', '.join(unknown)} unknown; an s2 mask takes {', '.join(S2)}")
    return HeadStride(**{**S2, **(overrides or {})})


def ideal_speedup(heads: HeadStride, seqlen: int, num_kv_heads: int) -> float:
    """Block-count speed-up of an S2 layout over dense causal: causal (query block, key block)
    tiles over the mean tiles a KV head visits, blocks of `heads.block` tokens (the most a
    kernel that skips hidden blocks can gain)."""
    from .cost import mask_keys

    blocks = -(-seqlen // heads.block)
    per_block = MaskSpec(causal=True, heads=HeadStride(1, heads.local_blocks, heads.vert_stride, heads.dense_heads))
    return blocks * (blocks + 1) / 2 / float(mask_keys(per_block, blocks, num_kv_heads).sum())


def make_mask(cell: dict) -> MaskSpec:
    """The mask of a benchmark cell or record: its `mask` kind over `seqlen` tokens, with its
    `window` and `doc_lens` where the kind has them ("window" is a sliding window alone).
    "prefix": causal with a bidirectional prefix of `prefix` tokens (PREFIX); "sink": the
    window plus `sink` sink tokens (SINK); "s2": causal with S2 head sparsity, `s2` a dict of
    `kernels.HeadStride` fields over the S2 defaults."""
    kind = cell["mask"]
    if kind not in MASK_KINDS:
        raise ValueError(f"mask={kind!r} is unknown; choose one of {', '.join(MASK_KINDS)}")
    window = cell["window"] if "window" in kind or kind == "sink" else None
    if "document" in kind:
        return MaskSpec.from_doc_lens(cell["doc_lens"], causal=True, window=window)
    if kind == "prefix":
        return MaskSpec(causal=True, prefix=cell.get("prefix", PREFIX))
    if kind == "sink":
        return MaskSpec(causal=True, window=window, sink=cell.get("sink", SINK))
    if kind == "s2":
        return MaskSpec(causal=True, heads=s2_heads(cell.get("s2")))
    return MaskSpec(causal=kind != "full", window=window)
