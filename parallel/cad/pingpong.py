"""Ping-pong: two nano-batches so one's communication overlaps the other's compute.

Every server's tasks are cut in two halves of equal pairs (`nano_batches`).  Forward
launches the Q/K/V all-to-alls of both halves (non-blocking, async_op=True), computes half 0
as soon as its rows arrive while half 1's are still in flight, starts sending half 0's
outputs back, then computes half 1.  Backward does the same with dO out and dQ/dK/dV back.
On GPU, NCCL runs the collectives on its own stream, so they overlap the kernels there too.
Exactness: the halves partition each server's query rows, each half carries every key its
rows need, so outputs are exact rows and gradients of shared keys are summed on return.
The lse rows travel back with the outputs when asked for, and their gradient out with dO.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from .dispatch import finish_back, gather_back, place, start
from .planner import server_rows
from .server import serve_backward, serve_forward
from .tasks import split_for_pairs


def _halve(tasks, kind):
    """Split one server's tasks (in order) into two lists of about equal pairs."""
    total = sum(t.pairs(kind) for t in tasks)
    first, second, acc = [], [], 0
    for t in tasks:
        p = t.pairs(kind)
        if acc >= total / 2:
            second.append(t)
        elif acc + p <= total / 2 or t.q_hi - t.q_lo == 1:
            first.append(t)
        else:
            a, b = t.q_lo - t.doc_start, t.q_hi - t.doc_start
            m = split_for_pairs(a, b, t.doc_len, kind, int(total / 2 - acc), tail=False, prefix=t.prefix)
            first.append(replace(t, q_hi=t.doc_start + m))
            second.append(replace(t, q_lo=t.doc_start + m))
            p = t.span_pairs(a, m, kind)
        acc += p
    return first, second


def nano_batches(plan, n: int = 2):
    """[(q_rows, kv_rows)] per nano-batch: per-server merged query / key intervals."""
    if n != 2:
        raise ValueError(f"ping-pong uses 2 nano-batches, got n={n}")
    halves = ([], [])
    for s in range(plan.world):
        a, b = _halve([t for t in plan.tasks if t.server == s], plan.kind)
        halves[0].extend(a)
        halves[1].extend(b)
    return [server_rows(h, plan.world, plan.kind) for h in halves]


class _Clock:
    """Accumulates seconds spent computing and seconds blocked waiting on communication."""

    def __init__(self, timing, prefix):
        self.timing, self.prefix = timing, prefix
        self.t0 = time.perf_counter()
        timing[f"{prefix}_compute_s"] = timing[f"{prefix}_wait_s"] = 0.0

    def wait(self, *works):
        t = time.perf_counter()
        for w in works:
            w.wait()
        self.timing[f"{self.prefix}_wait_s"] += time.perf_counter() - t

    def compute(self, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        self.timing[f"{self.prefix}_compute_s"] += time.perf_counter() - t
        return out

    def done(self):
        self.timing[f"{self.prefix}_total_s"] = time.perf_counter() - self.t0


class _PingPong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cad, timing, with_lse):
        clock, group = _Clock(timing, "pingpong_fwd"), cad.group
        sent = [(start(q, lay.q, group), start(k, lay.kv, group), start(v, lay.kv, group)) for lay in cad.nanos]
        saved, back = [], []
        for lay, ((q_s, wq), (k_s, wk), (v_s, wv)) in zip(cad.nanos, sent):
            clock.wait(wq, wk, wv)
            out_s, lse_s = clock.compute(serve_forward, q_s, k_s, v_s, lay.q_pos, lay.kv_pos, cad.mask,
                                         scale=cad.scale, backend=cad.backend)
            back.append(start(out_s, lay.back, group))
            if with_lse:  # lse [H, T] travels as rows [T, H]
                back.append(start(lse_s.t().contiguous(), lay.back, group))
            saved.append((q_s, k_s, v_s, out_s, lse_s))
        clock.wait(*[w for _, w in back])
        step = 2 if with_lse else 1
        out = sum(place(o, lay.back) for (o, _), lay in zip(back[::step], cad.nanos))
        lse = sum(place(x, lay.back) for (x, _), lay in zip(back[1::step], cad.nanos)).t() if with_lse else None
        clock.done()
        ctx.cad, ctx.saved, ctx.timing, ctx.rows = cad, saved, timing, (q.shape[0], k.shape[0])
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        cad, group = ctx.cad, ctx.cad.group
        clock = _Clock(ctx.timing, "pingpong_bwd")
        sent = [start(dout.contiguous(), lay.q, group) for lay in cad.nanos]
        # every rank takes the same branch: a missing or all-zero dlse is dropped everywhere alike
        with_dlse = dlse is not None
        sent_dlse = [start(dlse.t().contiguous(), lay.q, group) for lay in cad.nanos] if with_dlse else [None] * 2
        grads = []
        for lay, (do_s, w), dl, (q_s, k_s, v_s, out_s, lse_s) in zip(cad.nanos, sent, sent_dlse, ctx.saved):
            clock.wait(w, *([dl[1]] if dl else []))
            dq_s, dk_s, dv_s = clock.compute(serve_backward, do_s, q_s, k_s, v_s, out_s, lse_s, lay.q_pos,
                                             lay.kv_pos, cad.mask, scale=cad.scale, backend=cad.backend,
                                             dlse=dl[0].t().contiguous() if dl else None)
            grads.append((gather_back(dq_s, lay.q, group), gather_back(dk_s, lay.kv, group),
                          gather_back(dv_s, lay.kv, group)))
        clock.wait(*[w for g in grads for _, w in g])
        tq, tk = ctx.rows
        dq = sum(finish_back(g[0][0], lay.q, tq) for g, lay in zip(grads, cad.nanos))
        dk = sum(finish_back(g[1][0], lay.kv, tk) for g, lay in zip(grads, cad.nanos))
        dv = sum(finish_back(g[2][0], lay.kv, tk) for g, lay in zip(grads, cad.nanos))
        clock.done()
        return dq, dk, dv, None, None, None


class PingPong:
    """Entry point used by the strategy: out, lse (None unless asked for) and the dict its
    timing breakdown fills."""

    @staticmethod
    def run(q, k, v, cad, with_lse=False):
        timing = {}
        out, lse = _PingPong.apply(q, k, v, cad, timing, with_lse)
        return out, lse, timing
