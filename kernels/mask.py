"""Attention masks in global coordinates.

A `MaskSpec` describes which (query, key) pairs of the *whole* packed sequence may
attend.  Kernels only ever see a slice of that sequence (a ring block, a zigzag half, a
CAD task), described by the global positions of its rows, so a mask is evaluated from
positions, never from row indices.  That single rule is what lets every strategy call the
same kernel on any shard and get exactly the rows of the full-sequence result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Which (i, j) pairs of the global sequence may attend.

    causal:     i sees j only when pos_j <= pos_i.
    doc_ids:    LongTensor [seqlen]: document id of every global position; i sees j only
                inside the same document.  Give this or `cu_seqlens`, not both.
    cu_seqlens: LongTensor [ndocs + 1]: cumulative document lengths (0, l0, l0+l1, ...).
    window:     sliding window; i sees j when 0 <= pos_i - pos_j < window (a window
                is causal by definition).

    All constraints combine with AND.  A row that sees no key gets out = 0, lse = -inf.
    """

    causal: bool = False
    doc_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    window: int | None = None
    _docs: torch.Tensor | None = field(default=None, init=False, repr=False)

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

    # ---- construction helpers -------------------------------------------------------
    @classmethod
    def from_doc_lens(cls, doc_lens, *, causal: bool = True, window: int | None = None) -> "MaskSpec":
        lens = torch.as_tensor(list(doc_lens), dtype=torch.long)
        cu = torch.zeros(lens.numel() + 1, dtype=torch.long)
        cu[1:] = torch.cumsum(lens, 0)
        return cls(causal=causal, cu_seqlens=cu, window=window)

    # ---- queries --------------------------------------------------------------------
    @property
    def has_docs(self) -> bool:
        return self._docs is not None

    @property
    def is_causal(self) -> bool:
        """True when pairs with pos_j > pos_i are hidden (causal or a window)."""
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
        if self._docs is None:
            return None
        n = self._docs.numel()
        is_start = torch.ones(n, dtype=torch.bool)
        is_start[1:] = self._docs[1:] != self._docs[:-1]
        idx = torch.where(is_start, torch.arange(n), torch.zeros(n, dtype=torch.long))
        return torch.cummax(idx, 0).values

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

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Dense BoolTensor [Tq, Tk]: True where query q_pos[i] may attend key k_pos[j]."""
        qp = q_pos.to(torch.long).view(-1, 1)
        kp = k_pos.to(torch.long).view(1, -1)
        ok = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool, device=qp.device)
        if self.is_causal:
            ok &= kp <= qp
        if self.window is not None:
            ok &= (qp - kp) < self.window
        if self._docs is not None:
            qd = self.doc_of(q_pos).to(qp.device).view(-1, 1)
            kd = self.doc_of(k_pos).to(qp.device).view(1, -1)
            ok &= qd == kd
        return ok

    def pairs(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
        """Number of allowed (query, key) pairs among the given rows (attention work)."""
        return int(self.allowed(q_pos, k_pos).sum())

    def describe(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal")
        if self._docs is not None:
            parts.append(f"docs={len(self.doc_lens)}")
        if self.window is not None:
            parts.append(f"window={self.window}")
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
