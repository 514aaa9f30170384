"""Moving rows between owners and attention servers: routes and an autograd all-to-all.

A `Route` says which local rows go to which rank and where the rows received land.  The
forward of `exchange` is one variable-size all_to_all_single; its backward is the reverse
all-to-all followed by index_add, so a row sent to several servers (a key needed by tasks on
several ranks) gets the SUM of the gradients those servers computed for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import intervals as iv


@dataclass
class Route:
    """send_idx: local rows to send, grouped by destination rank (send_counts per rank);
    recv_counts: rows coming from each rank; recv_idx: output row of every received row
    (None: the output is the received rows in arrival order); out_rows: output length."""

    send_idx: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_idx: torch.Tensor | None
    out_rows: int

    def reverse(self, rows_in: int) -> "Route":
        """The route that sends rows back where they came from (rows_in = rows before send)."""
        return Route(self.recv_idx if self.recv_idx is not None else torch.arange(self.out_rows),
                     self.recv_counts, self.send_counts, self.send_idx, rows_in)


def to_server(rows, rank: int, tpr: int) -> tuple[Route, torch.Tensor]:
    """Route from owners to servers for per-server merged global intervals `rows`, and the
    global positions (ascending) of the rows this rank receives as a server."""
    world = len(rows)
    own_lo = rank * tpr
    sends = [iv.clip(rows[s], own_lo, own_lo + tpr) for s in range(world)]
    send_idx = torch.cat([iv.positions(x, own_lo) for x in sends]) if world else torch.zeros(0, dtype=torch.long)
    recv_counts = [iv.size(iv.clip(rows[rank], o * tpr, (o + 1) * tpr)) for o in range(world)]
    pos = iv.positions(rows[rank])
    return Route(send_idx, [iv.size(x) for x in sends], recv_counts, None, pos.numel()), pos


def _all_to_all(x: torch.Tensor, send_idx, send_counts, recv_counts, group, async_op=False):
    buf = x.index_select(0, send_idx.to(x.device)).contiguous()
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, buf, recv_counts, send_counts, group=group, async_op=async_op)
    return out, work


def place(received: torch.Tensor, route: Route) -> torch.Tensor:
    """Put received rows where the route says (identity when recv_idx is None)."""
    if route.recv_idx is None:
        return received
    out = received.new_zeros((route.out_rows,) + tuple(received.shape[1:]))
    return out.index_copy_(0, route.recv_idx.to(received.device), received)


def start(x: torch.Tensor, route: Route, group, async_op: bool = True):
    """Launch the all-to-all of `route` (no autograd); returns (received rows, work or None)."""
    return _all_to_all(x, route.send_idx, route.send_counts, route.recv_counts, group, async_op)


def gather_back(grad: torch.Tensor, route: Route, group, async_op: bool = True):
    """Launch the reverse of `route` for gradients; `finish_back` sums them into rows_in rows."""
    g = grad if route.recv_idx is None else grad.index_select(0, route.recv_idx.to(grad.device))
    out = grad.new_empty((sum(route.send_counts),) + tuple(grad.shape[1:]))
    work = dist.all_to_all_single(out, g.contiguous(), route.send_counts, route.recv_counts,
                                  group=group, async_op=async_op)
    return out, work


def finish_back(received: torch.Tensor, route: Route, rows_in: int) -> torch.Tensor:
    """Sum gradient rows received for the rows sent by `route` (duplicates add up)."""
    out = received.new_zeros((rows_in,) + tuple(received.shape[1:]))
    return out.index_add_(0, route.send_idx.to(received.device), received)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route, group):
        ctx.route, ctx.group, ctx.rows_in = route, group, x.shape[0]
        received, _ = start(x, route, group, async_op=False)
        return place(received, route)

    @staticmethod
    def backward(ctx, grad):
        received, _ = gather_back(grad, ctx.route, ctx.group, async_op=False)
        return finish_back(received, ctx.route, ctx.rows_in), None, None


def exchange(x: torch.Tensor, route: Route, group=None) -> torch.Tensor:
    """Differentiable all-to-all of x's rows along `route`."""
    return _Exchange.apply(x, route, group)


@dataclass
class ServerRoutes:
    """Everything one rank needs to run a set of tasks: Q and K/V routes to the servers,
    the server-side global positions, and the route that brings outputs back."""

    q: Route
    kv: Route
    back: Route
    q_pos: torch.Tensor
    kv_pos: torch.Tensor


def server_routes(q_rows, kv_rows, rank: int, tpr: int) -> ServerRoutes:
    """Routes of per-server merged query / key intervals (from a plan or a nano-batch)."""
    q, q_pos = to_server(q_rows, rank, tpr)
    kv, kv_pos = to_server(kv_rows, rank, tpr)
    return ServerRoutes(q, kv, q.reverse(tpr), q_pos, kv_pos)
