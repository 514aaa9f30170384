"""Communication pieces shared by the CP strategies.

- `group_layout`: rank, size and global ranks of a group, read locally (no collective).
- `p2p`: post a batch of non-blocking sends/receives (batch_isend_irecv) and wait later;
  the ring uses it to overlap the next block's transfer with this block's compute.
- `all_gather_rows` / `reduce_scatter_rows`: along dim 0, rank order; they are each
  other's adjoint, which is what the all-gather strategy's backward relies on.
- `all_to_all`: autograd-aware exchange of equal dim-0 chunks (chunk i goes to peer i);
  over a process group when one covers the peers, else as P2P messages (so the hybrid
  strategy needs no sub-group creation at construction).
- `nbytes`: bytes of a tensor of a given shape and dtype (stats are computed from shapes);
  `acc_dtype`: what partials and gradients are accumulated in.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def group_layout(group) -> tuple[int, int, list[int]]:
    """(rank in group, group size, global ranks in group order); single process if no PG."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group= was given but torch.distributed is not initialised")
        return 0, 1, [0]
    group = group if group is not None else dist.group.WORLD
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank()
    if me not in ranks:
        raise ValueError(f"this rank ({me}) is not a member of the CP group {ranks}")
    return ranks.index(me), len(ranks), ranks


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype partial outputs and dK/dV are accumulated (and reduced) in: float32, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Pending:
    """Requests of one posted batch; `wait()` blocks until all completed.  Holds the tensors
    sent until then (a sender may post a temporary, e.g. a compacted ring block)."""

    def __init__(self, reqs, tensors=()):
        self.reqs, self.tensors = reqs, list(tensors)

    def wait(self) -> None:
        for r in self.reqs:
            r.wait()
        self.reqs, self.tensors = [], []


def p2p(sends=(), recvs=()) -> Pending:
    """Post (tensor, global_peer, tag) sends and receives together, non-blocking."""
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
    return Pending(dist.batch_isend_irecv(ops) if ops else [], [t for t, _, _ in sends])


# newer torch names them *_single (the *_tensor names are deprecated there); older has only those
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x.contiguous(), group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x.contiguous(), group=group)
    return out


class AllGatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.group), None


def _exchange(x: torch.Tensor, group, peers: list[int], me: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    if group is not None:
        dist.all_to_all_single(out, x, group=group)
        return out
    chunks = x.chunk(len(peers))
    recv = list(out.chunk(len(peers)))
    recv[me].copy_(chunks[me])
    others = [i for i in range(len(peers)) if i != me]
    p2p([(chunks[i], peers[i], 0) for i in others], [(recv[i], peers[i], 0) for i in others]).wait()
    return out


class AllToAll(torch.autograd.Function):
    """Chunk i of x (dim 0, equal chunks) goes to peers[i]; chunk i of the result came from
    peers[i].  The adjoint of the exchange is the same exchange, so backward reuses it."""

    @staticmethod
    def forward(ctx, x, group, peers, me):
        ctx.args = (group, peers, me)
        return _exchange(x, group, peers, me)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, *ctx.args), None, None, None


def all_to_all(x: torch.Tensor, *, group, peers: list[int], me: int) -> torch.Tensor:
    """Autograd-aware all-to-all of equal dim-0 chunks; group=None sends P2P to `peers`."""
    if len(peers) == 1:
        return x
    return AllToAll.apply(x, group, peers, me)
