"""The CAD planner: assign attention tasks to servers so attention cost is balanced.

Pure function of (document lengths, tokens per rank, mask kind); no process group.  Costs
are pairs in KV-head units (`tasks.row_pairs`): with S2 heads each head's real pairs.

Start: every rank serves its own queries (one task per rank x document overlap), which is
`pairs_before`.  Then, until max/mean cost <= 1 + epsilon: take the most loaded server
(src) and the least loaded (dst), and move from src to dst either a whole task or the head
or tail query shard of one, sized to bring the two toward the mean, choosing the move that
costs the fewest new bytes per pair moved (Q rows of the moved queries + K/V rows dst does
not already own or receive).  Every move lowers the sum of squared loads, so the loop ends;
a move never makes dst heavier than src was.

Invariant: the tasks partition the query positions (each query row is computed once, with
all the keys its mask allows), so every allowed (query, key) pair is computed exactly once.
"""
from __future__ import annotations

import gc
import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from . import intervals as iv
from .tasks import TASK_OVERHEAD_PAIRS, MaskKind, Task, split_for_pairs


@dataclass
class Plan:
    """Task assignment plus its accounting; lists are indexed by rank (= server).  Pairs and
    costs are token pairs of all heads (with S2 heads: each KV head's pairs, averaged)."""

    doc_lens: list[int]
    tokens_per_rank: int
    kind: MaskKind
    tasks: list[Task]
    pairs_before: list[int]
    pairs_after: list[int]
    cost_before: list[int]
    cost_after: list[int]
    q_rows: list[list[tuple[int, int]]]  # per server: global query intervals it computes
    kv_rows: list[list[tuple[int, int]]]  # per server: global key intervals it needs
    q_in_rows: list[int]  # per server: query rows received from other ranks (= out rows sent back)
    kv_in_rows: list[int]  # per server: key/value rows received from other ranks, each once
    bytes_in: list[int]  # per server: Q + K/V bytes received from other ranks
    planning_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return len(self.pairs_after)

    def fingerprint(self) -> int:
        """63-bit hash of the assignment; equal on ranks that planned the same thing."""
        h = hashlib.sha256(repr((self.tokens_per_rank, self.kind,
                                 [(t.q_lo, t.q_hi, t.server, t.prefix) for t in self.tasks])).encode())
        return int.from_bytes(h.digest()[:8], "little") >> 1


def check_inputs(doc_lens, tokens_per_rank: int, epsilon: float) -> list[int]:
    lens = [int(x) for x in doc_lens]
    if not lens:
        raise ValueError("doc_lens is empty: give the lengths of the packed documents")
    if any(x <= 0 for x in lens):
        raise ValueError(f"doc_lens holds empty documents (lengths <= 0 at index {[i for i, x in enumerate(lens) if x <= 0][:5]}); drop them before planning")
    if tokens_per_rank <= 0:
        raise ValueError(f"tokens_per_rank={tokens_per_rank} must be positive")
    if sum(lens) % tokens_per_rank:
        raise ValueError(f"doc_lens sum to {sum(lens)} tokens, not a multiple of tokens_per_rank={tokens_per_rank}; "
                         "pad or trim the batch to ranks * tokens_per_rank tokens")
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon} must be > 0 (allowed max/mean attention cost is 1 + epsilon)")
    return lens


def doc_prefixes(mask, lens: list[int]) -> list[int]:
    """Prefix length of every document (zeros without a prefix-LM mask or for a MaskKind)."""
    prefix = getattr(mask, "prefix", None)
    if prefix is None:
        return [0] * len(lens)
    per_doc = [prefix] * len(lens) if isinstance(prefix, int) else [int(p) for p in prefix]
    if len(per_doc) != len(lens):
        raise ValueError(f"mask prefix lists {len(per_doc)} documents but doc_lens holds {len(lens)}; "
                         "give one prefix per document")
    long = [d for d, (p, n) in enumerate(zip(per_doc, lens)) if p > n]
    if long:
        raise ValueError(f"mask prefix is longer than documents {long[:5]}; a prefix must fit inside its document")
    return per_doc


def initial_tasks(lens: list[int], tpr: int, prefixes: list[int]) -> list[Task]:
    """One task per (document, owner rank) overlap, served by the owner."""
    tasks, start = [], 0
    for d, n in enumerate(lens):
        lo, end = start, start + n
        while lo < end:
            hi = min(end, (lo // tpr + 1) * tpr)
            tasks.append(Task(d, start, n, lo, hi, lo // tpr, prefixes[d]))
            lo = hi
        start = end
    return tasks


class _Balancer:
    """Mutable state of the greedy moves (loads, tasks per server, K/V each server holds)."""

    def __init__(self, tasks, world, tpr, kind, overhead, q_bytes, kv_bytes):
        self.tasks, self.world, self.tpr, self.kind = tasks, world, tpr, kind
        self.overhead, self.q_bytes, self.kv_bytes = overhead * kind.head_weight, q_bytes, kv_bytes
        self.by_server = [[] for _ in range(world)]
        self.loads = [0] * world
        self.kv_have: dict[tuple[int, int], list] = {}
        for i, t in enumerate(tasks):
            self._add(i)

    def _add(self, i):
        t = self.tasks[i]
        self.by_server[t.server].append(i)
        self.loads[t.server] += t.pairs(self.kind) + self.overhead
        key = (t.server, t.doc)
        self.kv_have[key] = iv.union(self.kv_have.get(key, []) + t.keys(self.kind))

    def _new_bytes(self, dst, t, a, b):
        """Bytes dst must newly receive to compute task t's queries at document offsets [a, b)."""
        owned = (dst * self.tpr, (dst + 1) * self.tpr)
        q = 0 if a + t.doc_start >= owned[0] and b + t.doc_start <= owned[1] else (b - a) * self.q_bytes
        moved = replace(t, q_lo=t.doc_start + a, q_hi=t.doc_start + b, server=dst)
        have = iv.union(self.kv_have.get((dst, t.doc), []) + [owned])
        return q + sum(iv.uncovered(lo, hi, have) for lo, hi in moved.keys(self.kind)) * self.kv_bytes

    def best_move(self, src, dst):
        """(score, task index, a, b) of the cheapest-in-bytes move toward the mean, or None."""
        mean = sum(self.loads) / self.world
        want = min(self.loads[src] - mean, mean - self.loads[dst])
        gap = self.loads[src] - self.loads[dst]
        best = None
        for i in self.by_server[src]:
            t = self.tasks[i]
            a, b = t.q_lo - t.doc_start, t.q_hi - t.doc_start
            pairs = t.pairs(self.kind)
            pieces = []
            if pairs + self.overhead <= want:
                pieces.append((a, b, pairs))
            elif want - self.overhead >= self.overhead and b - a > 1:
                target = int(want - self.overhead)
                m = split_for_pairs(a, b, t.doc_len, self.kind, target, tail=True, prefix=t.prefix)
                pieces.append((m, b, t.span_pairs(m, b, self.kind)))
                m = split_for_pairs(a, b, t.doc_len, self.kind, target, tail=False, prefix=t.prefix)
                pieces.append((a, m, t.span_pairs(a, m, self.kind)))
            for pa, pb, moved in pieces:
                if moved <= 0 or moved + self.overhead >= gap:
                    continue
                cost = self._new_bytes(dst, t, pa, pb)
                key = (cost / moved, -moved, i, pa)
                if best is None or key < best[0]:
                    best = (key, i, pa, pb)
        return best

    def apply(self, i, a, b, dst):
        """Move document offsets [a, b) of task i to dst (the rest stays on its server)."""
        t = self.tasks[i]
        src = t.server
        self.by_server[src].remove(i)
        self.loads[src] -= t.pairs(self.kind) + self.overhead
        ta, tb = t.q_lo - t.doc_start, t.q_hi - t.doc_start
        rest = [(ta, a)] if a > ta else [(b, tb)] if b < tb else []
        t.q_lo, t.q_hi, t.server = t.doc_start + a, t.doc_start + b, dst
        self._add(i)
        for ra, rb in rest:
            self.tasks.append(replace(t, q_lo=t.doc_start + ra, q_hi=t.doc_start + rb, server=src))
            self._add(len(self.tasks) - 1)


def server_rows(tasks, world, kind):
    """Per server: merged global query intervals and key intervals."""
    q = [[] for _ in range(world)]
    kv = [[] for _ in range(world)]
    for t in tasks:
        q[t.server].append((t.q_lo, t.q_hi))
        kv[t.server].extend(t.keys(kind))
    return [iv.union(x) for x in q], [iv.union(x) for x in kv]


def foreign_rows(rows, tpr: int) -> list[int]:
    """Per server: how many of its rows (merged intervals) other ranks own."""
    return [iv.size(r) - iv.size(iv.clip(r, s * tpr, (s + 1) * tpr)) for s, r in enumerate(rows)]


@contextmanager
def _no_gc():
    """Pause the cyclic garbage collector: planning allocates tens of thousands of small
    tuples and no reference cycles, and each collection it triggers would scan every object
    of the process (torch's alone are millions), which tripled the first plan's time."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def plan(doc_lens, tokens_per_rank: int, mask, *, epsilon: float = 0.1, backend: str = "default",
         task_overhead_pairs: int | None = None, q_bytes_per_token: int = 32 * 128 * 2,
         kv_bytes_per_token: int = 2 * 8 * 128 * 2, max_moves: int | None = None,
         num_kv_heads: int | None = None) -> Plan:
    """Plan CAD for packed documents `doc_lens` over sum(doc_lens) / tokens_per_rank ranks.

    mask: a kernels.MaskSpec (causal, window, prefix, sink and S2 heads are read; documents
    come from doc_lens) or a MaskKind.  num_kv_heads: needed with S2 heads, whose pairs are
    counted per KV head.  Cost of a task = its allowed pairs + task_overhead_pairs (default:
    the calibrated value for `backend`).  Byte sizes default to Hq=32, Hkv=8, D=128 in bf16.
    """
    with _no_gc():
        return _plan(doc_lens, tokens_per_rank, mask, epsilon, backend, task_overhead_pairs, q_bytes_per_token,
                     kv_bytes_per_token, max_moves, num_kv_heads)


def _plan(doc_lens, tokens_per_rank, mask, epsilon, backend, task_overhead_pairs, q_bytes_per_token,
          kv_bytes_per_token, max_moves, num_kv_heads) -> Plan:
    t0 = time.perf_counter()
    lens = check_inputs(doc_lens, tokens_per_rank, epsilon)
    kind = mask if isinstance(mask, MaskKind) else MaskKind.of(mask, num_kv_heads)
    prefixes = doc_prefixes(mask, lens)
    world = sum(lens) // tokens_per_rank
    overhead = TASK_OVERHEAD_PAIRS.get(backend, TASK_OVERHEAD_PAIRS["default"]) if task_overhead_pairs is None \
        else int(task_overhead_pairs)
    tasks = initial_tasks(lens, tokens_per_rank, prefixes)
    bal = _Balancer(tasks, world, tokens_per_rank, kind, overhead, q_bytes_per_token, kv_bytes_per_token)
    pairs_before = [0] * world
    for t in tasks:
        pairs_before[t.server] += t.pairs(kind)
    cost_before = list(bal.loads)
    moves = 0
    limit = max_moves if max_moves is not None else 20 * world + 100
    while moves < limit:
        mean = sum(bal.loads) / world
        src = max(range(world), key=lambda r: (bal.loads[r], -r))
        if bal.loads[src] <= (1 + epsilon) * mean:
            break
        dst = min(range(world), key=lambda r: (bal.loads[r], r))
        move = bal.best_move(src, dst)
        if move is None:
            break
        _, i, a, b = move
        bal.apply(i, a, b, dst)
        moves += 1
    tasks = sorted(bal.tasks, key=lambda t: (t.server, t.q_lo))
    pairs_after = [0] * world
    for t in tasks:
        pairs_after[t.server] += t.pairs(kind)
    q_rows, kv_rows = server_rows(tasks, world, kind)
    q_in, kv_in = foreign_rows(q_rows, tokens_per_rank), foreign_rows(kv_rows, tokens_per_rank)
    bytes_in = [q * q_bytes_per_token + kv * kv_bytes_per_token for q, kv in zip(q_in, kv_in)]
    pairs_before, pairs_after, cost_before, cost_after = ([kind.token_pairs(x) for x in xs] for xs in (
        pairs_before, pairs_after, cost_before, bal.loads))
    return Plan(lens, tokens_per_rank, kind, tasks, pairs_before, pairs_after, cost_before, cost_after,
                q_rows, kv_rows, q_in, kv_in, bytes_in, time.perf_counter() - t0,
                extra={"moves": moves, "task_overhead_pairs": overhead, "epsilon": epsilon})
