"""What every context-parallel strategy is (contract 2 of DESIGN.md).

A strategy owns one sharding of the global sequence (a balancer) and one way of
computing core attention over shards.  `shard`, `positions` and `unshard` are pure
bookkeeping; `attention` moves Q/K/V/partials between ranks and is exact: gathered
outputs and gradients equal single-process `kernels.attention` on the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import MaskSpec

from . import balance
from .comm import AllGatherRows, group_layout


@dataclass
class CPStats:
    """Accounting of the last `attention` call, computed from the plan when it is made.

    Lists are indexed by rank in the CP group, so every rank holds all ranks' values without
    a collective.  bytes_sent / bytes_recv: the forward's communication; the backward's is
    in extra["bytes_bwd_sent"] / extra["bytes_bwd_recv"] (per-rank lists).  pairs: allowed
    (query, key) token pairs each rank computes, in units of all Hq heads (a rank that
    computes 1/U of the heads over n pairs counts n / U).
    """

    bytes_sent: list[int] = field(default_factory=list)
    bytes_recv: list[int] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def imbalance(self, what: str = "pairs") -> float:
        return balance.imbalance(getattr(self, what))

    def as_dict(self, rank: int | None = None) -> dict:
        d = {"pairs_imbalance": self.imbalance("pairs")}
        if rank is not None and self.pairs:
            d.update(bytes_sent=self.bytes_sent[rank], bytes_recv=self.bytes_recv[rank], pairs=self.pairs[rank])
        for k, v in self.extra.items():
            if isinstance(v, (int, float)):
                d[k] = v
            elif rank is not None and isinstance(v, list) and len(v) == len(self.pairs):
                d[k] = v[rank]
        return d


class ContextParallel:
    """Base class: subclasses set `self.rank`, `self.world`, `self.index` (LongTensor of the
    global rows this rank owns, in local order) and implement `attention`.

    `setup` does the shared, collective-free part of construction: check the mask, read the
    group's layout, run the balancer (`self.indices[r]`: rows of CP rank r, ascending).

    Cost hooks (classmethods, no process group): what `parallel.perf` and `parallel=auto`
    know about a strategy comes from its own class, so a new strategy is one file plus
    its YAML.  `Layout` is `parallel.perf.cost.Layout`, `hw` a `parallel.perf.hardware.Hardware`;
    `options` are the strategy's own (e.g. ulysses_degree).  A strategy without a formula
    keeps the base hook, which raises ValueError naming it."""

    name = "base"
    sweeps_balancers = True  # the benchmark tries every balancer with it (False: it shards its own way)

    def __init__(self):
        self.stats = CPStats()

    def setup(self, mask, seqlen, group, balancer, options: dict, balancers=balance.BALANCERS, single=False,
              mesh=None) -> None:
        """group=None takes the CP group from `mesh` (a `groups.ParallelGroups` or a 1-D
        DeviceMesh), else the world; single=True: one rank holds everything."""
        if not isinstance(mask, MaskSpec):
            raise ValueError(f"mask must be a kernels.MaskSpec, got {type(mask).__name__}")
        if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 1:
            raise ValueError(f"seqlen={seqlen!r} must be a positive integer")
        name = balance.default_balancer(mask) if balancer is None and not single else balancer or "contiguous"
        group = self.cp_group(group, mesh)
        if name not in balancers:
            raise ValueError(
                f"balancer={name!r} is not supported by strategy {self.name!r}; choose one of {', '.join(balancers)}"
            )
        self.mask, self.seqlen, self.balancer = mask, seqlen, name
        self.rank, self.world, self.ranks = (0, 1, [0]) if single else group_layout(group)
        self.group = group
        if self.world > 1 and group is None:
            import torch.distributed as dist

            self.group = dist.group.WORLD
        balancer_options = {k: options.pop(k) for k in ("stripe",) if k in options}
        self.indices = balance.assign(name, seqlen, self.world, mask, **balancer_options)
        self.index = self.indices[self.rank]
        self.backend = options.pop("backend", "auto")
        self.scale = options.pop("scale", None)

    @staticmethod
    def cp_group(group, mesh):
        """The CP group: `group`, else the one of `mesh` (a `groups.ParallelGroups` or a 1-D
        DeviceMesh), else None (the world)."""
        if group is None and mesh is not None:
            return mesh.cp_group if hasattr(mesh, "cp_group") else mesh.get_group()
        return group

    @classmethod
    def _no_model(cls, what: str):
        raise ValueError(f"strategy {cls.name!r} has no {what} model; the cost model covers strategies that "
                         f"define {what} hooks (see parallel/base.py)")

    @classmethod
    def cost_bytes(cls, lay, world: int, **options) -> dict[str, list[int]]:
        """Bytes each of `world` ranks sends in one call: {"fwd": [...], "bwd": [...]}."""
        cls._no_model("bytes")

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen: int, rows: list[torch.Tensor], **options) -> list[tuple[int, int, int]]:
        """Per rank, (diagonal rows, split rows, hidden pairs) of the kernel calls it makes
        (`parallel.perf.cost.tile_cut` / `steps_cut`); rows: every rank's rows, sorted."""
        cls._no_model("kernel cut")

    @classmethod
    def cost_memory(cls, lay, world: int, **options) -> tuple[int, int]:
        """(fwd, bwd) peak bytes one rank allocates beyond its inputs
        (`parallel.perf.cost.memory_per_rank`)."""
        cls._no_model("memory")

    @classmethod
    def cost_time(cls, pairs: list[int], lay, hw, **options) -> tuple[float, float]:
        """(fwd, bwd) seconds of one call given every rank's attention pairs, before the
        kernel's tile costs (`parallel.perf.predict`)."""
        cls._no_model("time")

    @classmethod
    def head_split(cls, world: int, options: dict) -> int:
        """Into how many parts the strategy splits the query heads on `world` ranks."""
        return 1

    @classmethod
    def shape_options(cls, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
        """Options the strategy needs from the model's attention shape (none by default)."""
        return {}

    @classmethod
    def auto_candidates(cls, world: int, mask, lay, balancer=None) -> list[tuple[str | None, dict]]:
        """(balancer, options) pairs `parallel=auto` compares for this strategy (balancer:
        the one auto was given, or None)."""
        return [(None, {})]

    @staticmethod
    def reject_unknown(options: dict, strategy: str) -> None:
        if options:
            raise ValueError(f"strategy {strategy!r} got unknown option(s) {', '.join(sorted(options))}")

    @property
    def positions(self) -> torch.Tensor:
        return self.index

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.seqlen:
            raise ValueError(f"shard expects [seqlen={self.seqlen}, ...], got {tuple(x.shape)}")
        return x.index_select(0, self.index.to(x.device))

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        """All ranks' rows back in global order (differentiable: backward reduce-scatters)."""
        if x_local.shape[0] != self.index.numel():
            raise ValueError(f"unshard expects [{self.index.numel()}, ...] local rows, got {tuple(x_local.shape)}")
        rows = AllGatherRows.apply(x_local, self.group) if self.world > 1 else x_local
        order = torch.argsort(torch.cat(self.indices)).to(rows.device)
        return rows.index_select(0, order)

    def check_inputs(self, q, k, v) -> None:
        """Shape checks every rank makes before any collective (shapes agree across ranks)."""
        from kernels.api import validate

        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != self.index.numel():
                raise ValueError(f"{name} must be [{self.index.numel()} local rows, heads, head_dim], got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        validate(q, k, v, self.mask, self.index, self.index, self.scale)

    def attention(self, q, k, v):
        """Local q [T_local, Hq, D], k/v [T_local, Hkv, D] -> local output rows."""
        return self.compute(q, k, v, with_lse=False)[0]

    def attention_with_lse(self, q, k, v):
        """(out, lse) of the local query rows; lse [Hq, T_local] float32 (float64 for float64)."""
        return self.compute(q, k, v, with_lse=True)

    def compute(self, q, k, v, with_lse: bool):
        """(out, lse or None): strategies that must move lse to return it skip that when not asked."""
        raise NotImplementedError
