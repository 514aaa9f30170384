"""The rank grid: the one place that knows which global rank plays which role.

`ParallelDims` validates the degrees (pure, no process group needed) and lays the world
out as one grid, `torch.arange(world).view(dp, cp, tp)`, tp innermost (adjacent ranks
share a node for the chattiest axis), then cp, then dp -- the order megatron-core's
parallel_state uses.  Inside cp, the Ulysses x ring split of the hybrid strategy puts
Ulysses innermost by default (its all-to-all stays intra-node; the ring's P2P crosses
nodes).  `build()` turns the grid into torch.distributed groups; every rank creates every
group in the same order, as torch requires.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    cp: int = 1
    dp: int | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    ulysses_inner: bool = True

    def __post_init__(self):
        for name in ("world_size", "tp", "cp"):
            _check_degree(name, getattr(self, name))
        if self.world_size % (self.tp * self.cp):
            raise ValueError(
                f"world_size={self.world_size} is not divisible by tp*cp={self.tp}*{self.cp}; "
                f"choose tp and cp whose product divides the number of ranks"
            )
        dp = self.world_size // (self.tp * self.cp) if self.dp is None else self.dp
        _check_degree("dp", dp)
        if self.tp * self.cp * dp != self.world_size:
            raise ValueError(
                f"tp*cp*dp = {self.tp}*{self.cp}*{dp} = {self.tp * self.cp * dp} != world_size={self.world_size}; "
                f"set dp=None to derive it, or change the degrees"
            )
        object.__setattr__(self, "dp", dp)
        uly, ring = self.ulysses_degree, self.ring_degree
        for name, val in (("ulysses_degree", uly), ("ring_degree", ring)):
            if val is not None:
                _check_degree(name, val)
                if self.cp % val:
                    raise ValueError(f"{name}={val} must divide cp={self.cp}")
        if uly is None and ring is None:
            uly, ring = 1, self.cp
        elif uly is None:
            uly = self.cp // ring
        elif ring is None:
            ring = self.cp // uly
        if uly * ring != self.cp:
            raise ValueError(
                f"ulysses_degree*ring_degree = {uly}*{ring} = {uly * ring} != cp={self.cp}; "
                f"their product must be the CP size"
            )
        object.__setattr__(self, "ulysses_degree", uly)
        object.__setattr__(self, "ring_degree", ring)

    # ---- the grid (pure) -------------------------------------------------------------
    @property
    def grid(self) -> torch.Tensor:
        """Global ranks laid out as [dp, cp, tp]."""
        return torch.arange(self.world_size).view(self.dp, self.cp, self.tp)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, cp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside world_size={self.world_size}")
        return rank // (self.cp * self.tp), (rank // self.tp) % self.cp, rank % self.tp

    def cp_split(self, cp_rank: int) -> tuple[int, int]:
        """(ulysses_rank, ring_rank) of a position inside the CP group."""
        if self.ulysses_inner:
            return cp_rank % self.ulysses_degree, cp_rank // self.ulysses_degree
        return cp_rank // self.ring_degree, cp_rank % self.ring_degree

    def rank_lists(self) -> dict[str, list[list[int]]]:
        """Every group of every kind as lists of global ranks, in creation order."""
        g = self.grid
        cp_blocks = g.permute(0, 2, 1).reshape(-1, self.cp)  # one row per (dp, tp): its cp ranks
        if self.ulysses_inner:
            by_ring = cp_blocks.view(-1, self.ring_degree, self.ulysses_degree)
        else:
            by_ring = cp_blocks.view(-1, self.ulysses_degree, self.ring_degree).transpose(1, 2)
        # by_ring[b, r, u]: global rank at ring position r, ulysses position u of cp block b
        lists = {
            "tp": g.reshape(-1, self.tp),
            "cp": cp_blocks,
            "dp": g.permute(1, 2, 0).reshape(-1, self.dp),
            "dp_cp": g.permute(2, 0, 1).reshape(self.tp, -1),
            "ulysses": by_ring.reshape(-1, self.ulysses_degree),
            "ring": by_ring.transpose(1, 2).reshape(-1, self.ring_degree),
        }
        return {name: t.tolist() for name, t in lists.items()}

    # ---- process groups --------------------------------------------------------------
    def build(self, backend: str | None = None) -> "ParallelGroups":
        """Create every group (collective over the world: call on all ranks)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("ParallelDims.build() needs torch.distributed initialised (init_process_group)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims(world_size={self.world_size}) does not match the process group's "
                f"world size {dist.get_world_size()}"
            )
        rank = dist.get_rank()
        groups = {}
        for name, ranks in self.rank_lists().items():
            groups[name], _ = dist.new_subgroups_by_enumeration(ranks, backend=backend)
        dp_rank, cp_rank, tp_rank = self.coordinates(rank)
        uly_rank, ring_rank = self.cp_split(cp_rank)
        return ParallelGroups(
            dims=self, rank=rank, dp_rank=dp_rank, cp_rank=cp_rank, tp_rank=tp_rank,
            ulysses_rank=uly_rank, ring_rank=ring_rank,
            tp_group=groups["tp"], cp_group=groups["cp"], dp_group=groups["dp"],
            dp_cp_group=groups["dp_cp"], ulysses_group=groups["ulysses"], ring_group=groups["ring"],
        )


@dataclass
class ParallelGroups:
    """This rank's groups and coordinates (from `ParallelDims.build`)."""

    dims: ParallelDims
    rank: int
    dp_rank: int
    cp_rank: int
    tp_rank: int
    ulysses_rank: int
    ring_rank: int
    tp_group: object
    cp_group: object
    dp_group: object
    dp_cp_group: object
    ulysses_group: object
    ring_group: object


def _check_degree(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
