"""What every context-parallel strategy is (contract 2 of DESIGN.md).

A strategy owns one sharding of the global sequence (a balancer) and one way of
computing core attention over shards.  `shard`, `positions` and `unshard` are pure
bookkeeping; `attention` moves Q/K/V/partials between ranks and is exact: gathered
outputs and gradients equal single-process `kernels.attention` on the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CPStats:
    """Accounting of the last `attention` call (forward, plus backward once it ran).

    Lists are indexed by rank in the CP group and computed from the plan, so every rank
    holds all ranks' values without a collective.
    """

    bytes_sent: list[int] = field(default_factory=list)
    bytes_recv: list[int] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def imbalance(self, what: str = "pairs") -> float:
        vals = getattr(self, what)
        mean = sum(vals) / max(len(vals), 1)
        return max(vals) / mean if mean > 0 else 1.0

    def as_dict(self, rank: int | None = None) -> dict:
        d = {"pairs_imbalance": self.imbalance("pairs")}
        if rank is not None and self.pairs:
            d.update(bytes_sent=self.bytes_sent[rank], bytes_recv=self.bytes_recv[rank], pairs=self.pairs[rank])
        d.update({k: v for k, v in self.extra.items() if isinstance(v, (int, float))})
        return d


class ContextParallel:
    """Base class: subclasses set `self.rank`, `self.world`, `self.index` (LongTensor of the
    global rows this rank owns, in local order) and implement `attention`."""

    name = "base"

    def __init__(self):
        self.stats = CPStats()

    @property
    def positions(self) -> torch.Tensor:
        return self.index

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.seqlen:
            raise ValueError(f"shard expects [seqlen={self.seqlen}, ...], got {tuple(x.shape)}")
        return x.index_select(0, self.index.to(x.device))

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, q, k, v):
        raise NotImplementedError
