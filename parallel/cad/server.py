"""An attention server: all tasks it received run as ONE kernel call.

The server holds the query rows of its tasks and the union of their key rows, each set in
ascending global position, and calls `kernels.attention` once with their GLOBAL positions
and the global MaskSpec.  That separates tasks without synthetic ids: a query row only
attends keys of its own document that its mask allows (causal, window, prefix, sinks; with
S2 heads each KV head its own keys), and the server holds every such key (its task's key
ranges, the union over the heads, are in the union), so each row's result is its exact
full-sequence row.  Two tasks of one document share their keys, which are held once.
"""
from __future__ import annotations

import kernels


def serve(q, k, v, q_pos, k_pos, mask, *, scale=None, backend="auto"):
    """Differentiable batched attention of a server's rows: (out [Tq, Hq, D], lse [Hq, Tq])."""
    return kernels.attention(q, k, v, mask, q_pos=q_pos.to(q.device), k_pos=k_pos.to(q.device),
                             scale=scale, backend=backend)


def serve_forward(q, k, v, q_pos, k_pos, mask, *, scale=None, backend="auto"):
    """Forward only (for strategies with their own autograd Function, e.g. ping-pong)."""
    return kernels.forward(q, k, v, mask, q_pos=q_pos.to(q.device), k_pos=k_pos.to(q.device),
                           scale=scale, backend=backend)


def serve_backward(dout, q, k, v, out, lse, q_pos, k_pos, mask, *, scale=None, backend="auto", dlse=None):
    """(dq, dk, dv) of a server's rows given their final out / lse (and the gradient of lse, if any)."""
    return kernels.backward(dout, q, k, v, out, lse, mask, q_pos=q_pos.to(q.device),
                            k_pos=k_pos.to(q.device), scale=scale, dlse=dlse, backend=backend)
