"""Attention masks in global coordinates.

A `MaskSpec` describes which (query, key) pairs of the *whole* packed sequence may
attend.  Kernels only ever see a slice of that sequence (a ring block, a zigzag half, a
CAD task), described by the global positions of its rows, so a mask is evaluated from
positions, never from row indices.  That single rule is what lets every strategy call the
same kernel on any shard and get exactly the rows of the full-sequence result.

The formula (contract 1b of DESIGN.md), for query i, key j and KV head h, with r(p) the
position of p inside its document:

    allowed_h(i, j) = same and (pre or snk or (local and sparse_h))

`same`: one document; `local`: causal / window; `pre`: both inside the document's prefix
(bidirectional); `snk`: j is one of the first `sink` tokens of the document and j <= i;
`sparse_h`: S2 head sparsity (`HeadStride`), True without `heads`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


@dataclass(frozen=True)
class HeadStride:
    """S2-Attention layout: KV head h sees, besides the band of its `local_blocks` nearest
    key blocks, every key block b with (b + h) % vert_stride == 0; heads below
    `dense_heads` see every block.  Blocks of `block` tokens count from each document's
    start.  The heads together cover the context when dense_heads >= 1 or the sparse heads
    reach every residue (Hkv - dense_heads >= vert_stride)."""

    block: int
    local_blocks: int
    vert_stride: int
    dense_heads: int = 0

    def __post_init__(self):
        _check_int("HeadStride block", self.block, 1)
        _check_int("HeadStride local_blocks", self.local_blocks, 0)
        _check_int("HeadStride vert_stride", self.vert_stride, 1)
        _check_int("HeadStride dense_heads", self.dense_heads, 0)

    def missing_residues(self, num_kv_heads: int) -> list[int]:
        """Residues b % vert_stride of key blocks that no head sees beyond its local band."""
        if self.dense_heads >= 1:
            return []
        covered = {(-h) % self.vert_stride for h in range(num_kv_heads)}
        return [r for r in range(self.vert_stride) if r not in covered]

    def check_cover(self, num_kv_heads: int) -> None:
        missing = self.missing_residues(num_kv_heads)
        if missing:
            raise ValueError(
                f"HeadStride(vert_stride={self.vert_stride}, dense_heads={self.dense_heads}) with "
                f"num_kv_heads={num_kv_heads} does not cover the context: no head sees key blocks b with "
                f"b % {self.vert_stride} in {missing}; use num_kv_heads - dense_heads >= vert_stride or "
                f"dense_heads >= 1")

    def sees_block(self, heads: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
        """Head `heads` sees key `rk` (document-relative) at any distance: dense or strided."""
        return (heads < self.dense_heads) | ((torch.div(rk, self.block, rounding_mode="floor") + heads)
                                             % self.vert_stride == 0)

    def near(self, rq: torch.Tensor, rk: torch.Tensor) -> torch.Tensor:
        """Key block within the local band of the query's block."""
        return (torch.div(rq, self.block, rounding_mode="floor")
                - torch.div(rk, self.block, rounding_mode="floor")) < self.local_blocks


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Which (i, j) pairs of the global sequence may attend (see the module docstring).

    causal:     i sees j only when pos_j <= pos_i.
    doc_ids:    LongTensor [seqlen]: document id of every global position; i sees j only
                inside the same document.  Give this or `cu_seqlens`, not both.
    cu_seqlens: LongTensor [ndocs + 1]: cumulative document lengths (0, l0, l0+l1, ...).
    window:     sliding window; i sees j when 0 <= pos_i - pos_j < window (a window
                is causal by definition).
    prefix:     prefix-LM: the first P tokens of a document see each other both ways; one
                int for every document or a list with one entry per document.
    sink:       every query sees the first `sink` tokens of its document (j <= i), past
                the window and head sparsity; needs a causal mask or a window.
    heads:      a `HeadStride`: the mask depends on the KV head (S2 sparsity).

    A row that sees no key gets out = 0, lse = -inf.
    """

    causal: bool = False
    doc_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    window: int | None = None
    prefix: int | list[int] | None = None
    sink: int | None = None
    heads: HeadStride | None = None
    _docs: torch.Tensor | None = field(default=None, init=False, repr=False)
    _starts: torch.Tensor | None = field(default=None, init=False, repr=False)
    _prefix: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"mask window={self.window!r} must be an int >= 1 (or None for no window)")
        if self.doc_ids is not None and self.cu_seqlens is not None:
            raise ValueError("MaskSpec takes doc_ids or cu_seqlens, not both")
        docs = None
        if self.cu_seqlens is not None:
            cu = torch.as_tensor(self.cu_seqlens, dtype=torch.long).cpu()
            if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0:
                raise ValueError(f"mask cu_seqlens must be 1-D, start at 0 and hold ndocs+1 entries, got {cu.tolist()[:8]}")
            lens = cu[1:] - cu[:-1]
            if bool((lens <= 0).any()):
                raise ValueError("mask cu_seqlens must be strictly increasing (no empty documents)")
            docs = torch.repeat_interleave(torch.arange(lens.numel()), lens)
        elif self.doc_ids is not None:
            docs = torch.as_tensor(self.doc_ids, dtype=torch.long).cpu()
            if docs.dim() != 1:
                raise ValueError(f"mask doc_ids must be 1-D [seqlen], got shape {tuple(docs.shape)}")
        object.__setattr__(self, "_docs", docs)
        if docs is not None:
            n = docs.numel()
            is_start = torch.ones(n, dtype=torch.bool)
            is_start[1:] = docs[1:] != docs[:-1]
            idx = torch.where(is_start, torch.arange(n), torch.zeros(n, dtype=torch.long))
            object.__setattr__(self, "_starts", torch.cummax(idx, 0).values)
        if self.sink is not None:
            _check_int("mask sink", self.sink, 1)
            if not self.is_causal:
                raise ValueError(f"mask sink={self.sink} needs a causal mask (causal=True or a window): a sink "
                                 "adds keys to causal rows, a non-causal row already sees its whole document")
        if self.heads is not None and not isinstance(self.heads, HeadStride):
            raise ValueError(f"mask heads must be a kernels.HeadStride, got {type(self.heads).__name__}")
        if self.prefix is not None:
            object.__setattr__(self, "_prefix", self._check_prefix())

    def _check_prefix(self) -> torch.Tensor:
        """Prefix length P of every global position's document ([seqlen]; one value without
        documents).  A list gives one entry per document, in order."""
        lens = self.doc_lens
        if isinstance(self.prefix, int) and not isinstance(self.prefix, bool):
            _check_int("mask prefix", self.prefix, 0)
            per_doc = [self.prefix] * (1 if lens is None else len(lens))
        else:
            per_doc = list(self.prefix)
            for p in per_doc:
                _check_int("mask prefix entries", p, 0)
            if lens is None or len(per_doc) != len(lens):
                raise ValueError(f"mask prefix is a list of {len(per_doc)} entries but the mask has "
                                 f"{'no documents' if lens is None else f'{len(lens)} documents'}; give one "
                                 "prefix per document (with cu_seqlens), or one int for all")
        if lens is None:
            return torch.tensor(per_doc, dtype=torch.long)
        for n, (p, length) in enumerate(zip(per_doc, lens)):
            if p > length:
                raise ValueError(f"mask prefix={p} is longer than document {n} ({length} tokens); a prefix "
                                 "must fit inside its document")
        return torch.repeat_interleave(torch.tensor(per_doc, dtype=torch.long), torch.tensor(lens))

    # ---- construction helpers -------------------------------------------------------
    @classmethod
    def from_doc_lens(cls, doc_lens, *, causal: bool = True, window: int | None = None, **kinds) -> "MaskSpec":
        """Documents from their lengths; `kinds`: prefix, sink, heads."""
        lens = torch.as_tensor(list(doc_lens), dtype=torch.long)
        cu = torch.zeros(lens.numel() + 1, dtype=torch.long)
        cu[1:] = torch.cumsum(lens, 0)
        return cls(causal=causal, cu_seqlens=cu, window=window, **kinds)

    def without_heads(self) -> "MaskSpec":
        """The same mask with every head dense (the union over heads when they cover)."""
        return self if self.heads is None else replace(self, heads=None)

    # ---- queries --------------------------------------------------------------------
    @property
    def has_docs(self) -> bool:
        return self._docs is not None

    @property
    def is_causal(self) -> bool:
        """True when pairs with pos_j > pos_i are hidden outside a prefix (causal or a window)."""
        return self.causal or self.window is not None

    @property
    def seqlen(self) -> int | None:
        """Length of the global sequence the documents describe (None without documents)."""
        return None if self._docs is None else int(self._docs.numel())

    @property
    def doc_lens(self) -> list[int] | None:
        if self._docs is None:
            return None
        return torch.unique_consecutive(self._docs, return_counts=True)[1].tolist()

    @property
    def cu_doc_starts(self) -> torch.Tensor | None:
        """Start position of the document of every global position, LongTensor [seqlen]."""
        return self._starts

    def doc_of(self, pos: torch.Tensor) -> torch.Tensor | None:
        """Document id of each global position (None when the mask has no documents)."""
        if self._docs is None:
            return None
        pos = pos.to("cpu", torch.long)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self._docs.numel()):
            raise ValueError(
                f"positions span [{int(pos.min())}, {int(pos.max())}] but the mask's documents "
                f"cover seqlen={self._docs.numel()}"
            )
        return self._docs[pos]

    def relative(self, pos: torch.Tensor) -> torch.Tensor:
        """r(p): position inside its document (p itself without documents), on pos's device."""
        if self._starts is None:
            return pos.to(torch.long)
        self.doc_of(pos)  # range check
        return pos.to(torch.long) - self._starts[pos.to("cpu", torch.long)].to(pos.device)

    def prefix_len(self, pos: torch.Tensor) -> torch.Tensor:
        """P(doc(p)): the prefix length of each position's document (0 without a prefix)."""
        if self._prefix is None:
            return torch.zeros(pos.shape, dtype=torch.long, device=pos.device)
        where = torch.zeros_like(pos, device="cpu") if self._docs is None else pos.to("cpu", torch.long)
        return self._prefix[where].to(pos.device)

    def in_prefix(self, pos: torch.Tensor) -> torch.Tensor:
        """r(p) < P(doc(p)): p lies in its document's prefix (all False without a prefix)."""
        return self.relative(pos) < self.prefix_len(pos)

    def in_sink(self, pos: torch.Tensor) -> torch.Tensor:
        """r(p) < sink: p is one of its document's sink tokens (all False without a sink)."""
        if self.sink is None:
            return torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)
        return self.relative(pos) < self.sink

    def kv_heads_for(self, num_kv_heads: int | None, kv_heads=None) -> torch.Tensor:
        """Global KV-head index of each head a call computes: `kv_heads` when given (a subset
        of a larger set, e.g. one Ulysses rank's), else 0..num_kv_heads-1, whose cover is
        checked here."""
        if kv_heads is not None:
            heads = torch.as_tensor(kv_heads, dtype=torch.long).cpu()
            if heads.dim() != 1 or (heads.numel() and int(heads.min()) < 0):
                raise ValueError(f"kv_heads must be a 1-D list of KV-head indices >= 0, got {heads.tolist()}")
            return heads
        if num_kv_heads is None:
            raise ValueError("this mask depends on the KV head (heads=HeadStride(...)); pass num_kv_heads=")
        _check_int("num_kv_heads", num_kv_heads, 1)
        if self.heads is not None:
            self.heads.check_cover(num_kv_heads)
        return torch.arange(num_kv_heads)

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor, num_kv_heads: int | None = None, *,
                kv_heads=None) -> torch.Tensor:
        """Dense BoolTensor: True where query q_pos[i] may attend key k_pos[j].  [Tq, Tk]
        without `heads`; [Hkv, Tq, Tk] with them (num_kv_heads=, or kv_heads= the global
        indices of the heads wanted)."""
        qp = q_pos.to(torch.long).view(-1, 1)
        kp = k_pos.to(torch.long).view(1, -1)
        dev = qp.device
        local = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool, device=dev)
        if self.is_causal:
            local &= kp <= qp
        if self.window is not None:
            local &= (qp - kp) < self.window
        bypass = torch.zeros_like(local)
        if self._prefix is not None:
            bypass |= self.in_prefix(q_pos).to(dev).view(-1, 1) & self.in_prefix(k_pos).to(dev).view(1, -1)
        if self.sink is not None:
            bypass |= self.in_sink(k_pos).to(dev).view(1, -1) & (kp <= qp)
        if self.heads is not None:
            heads = self.kv_heads_for(num_kv_heads, kv_heads).to(dev).view(-1, 1, 1)
            rq, rk = self.relative(q_pos).to(dev).view(1, -1, 1), self.relative(k_pos).to(dev).view(1, 1, -1)
            local = local & (self.heads.near(rq, rk) | self.heads.sees_block(heads, rk))
        ok = bypass | local
        if self._docs is not None:
            qd = self.doc_of(q_pos).to(dev).view(-1, 1)
            kd = self.doc_of(k_pos).to(dev).view(1, -1)
            ok = ok & (qd == kd)
        return ok

    def pairs(self, q_pos: torch.Tensor, k_pos: torch.Tensor, num_kv_heads: int | None = None) -> int:
        """Number of allowed (query, key) pairs among the given rows (attention work); with
        `heads`, summed over the KV heads."""
        return int(self.allowed(q_pos, k_pos, num_kv_heads).sum())

    def describe(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal")
        if self._docs is not None:
            parts.append(f"docs={len(self.doc_lens)}")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.prefix is not None:
            parts.append(f"prefix={self.prefix}")
        if self.sink is not None:
            parts.append(f"sink={self.sink}")
        if self.heads is not None:
            h = self.heads
            parts.append(f"s2={h.block}/{h.local_blocks}/{h.vert_stride}/{h.dense_heads}")
        return "+".join(parts) or "full"


def check_positions(name: str, pos: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    """Validate (or default) the global positions of `rows` rows."""
    if pos is None:
        return torch.arange(rows, device=device)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.numel() != rows:
        shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"{name} must be a 1-D LongTensor with one position per row ({rows}), got {shape}")
    if pos.dtype.is_floating_point:
        raise ValueError(f"{name} must hold integer positions, got dtype {pos.dtype}")
    return pos.to(device=device, dtype=torch.long)
