"""What every peer adapter shares: the benchmark's face (shard / positions / attention /
stats / close), the row layouts, and the checks that turn "cannot run this cell" into a
ValueError naming why (recorded as SKIPPED, the same on every rank, before any collective)."""
from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

from parallel.perf.cost import balancer_rows

INSTALL = "pip install --no-deps yunchang==0.6.4 ring-flash-attn==0.1.8  (or: pip install -e '.[peers]')"


class Peer:
    """A published CP implementation run as its users run it, on local rows [T_local, H, D].

    Subclasses set `name`, `needs` (import names that must be installed), `masks` (the mask
    kinds it can express; others are refused with `why_not`), and build `index` (the global
    positions of this rank's rows, in the peer's own layout)."""

    name = "peer"
    needs: tuple = ()
    masks: tuple = ("causal",)
    why_not = "it has no way to express this mask"
    stats = None

    def __init__(self, mask, cell: dict, device: torch.device):
        self.cell, self.device, self.mask = cell, device, mask
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.seqlen, self.hq, self.hkv = cell["seqlen"], cell["hq"], cell["hkv"]
        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"{self.name}: {', '.join(missing)} not installed; install with: {INSTALL}")
        if cell["mask"] not in self.masks:
            raise ValueError(f"{self.name} cannot express mask={cell['mask']!r}: {self.why_not} "
                             f"(it runs: {', '.join(self.masks)})")
        if self.seqlen % (2 * self.world):
            raise ValueError(f"{self.name}: seqlen={self.seqlen} must be divisible by 2 x world={2 * self.world}")
        self.index = torch.arange(self.seqlen)
        self.version = ""

    def need_heads_divisible(self, degree: int):
        if self.hq % degree or self.hkv % degree:
            raise ValueError(f"{self.name}: Hq={self.hq} and Hkv={self.hkv} must be divisible by its all-to-all "
                             f"degree {degree} (it does not replicate KV heads)")

    def rows(self, balancer: str) -> torch.Tensor:
        return torch.as_tensor(balancer_rows(balancer, self.seqlen, self.world)[self.rank])

    @property
    def positions(self) -> torch.Tensor:
        return self.index

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.index.to(x.device))

    def attention(self, q, k, v):
        raise NotImplementedError

    def close(self):
        """Leave whatever the peer holds between calls (torch CP's dispatcher)."""

    def describe(self) -> str:
        return self.version


def doc_lens(cell: dict) -> list[int]:
    """The cell's document lengths (one document when the mask has none)."""
    return list(cell.get("doc_lens") or [cell["seqlen"]])


def window_size(cell: dict) -> tuple[int, int]:
    """flash-attn's (left, right) for the cell's window: token i sees j in [i - w + 1, i]."""
    return (cell["window"] - 1, 0) if "window" in cell["mask"] else (-1, -1)


def cu_seqlens(cell: dict) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(doc_lens(cell)).cumsum(0).tolist(), dtype=torch.int32)
