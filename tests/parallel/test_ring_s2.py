"""Ring attention under S2 head sparsity: each hop carries only the (row, KV head) entries
some later query needs (`parallel.ring_wire`).  The needed entries equal the dense mask's
(property test); on 2 and 4 ranks out, lse, dq, dk, dv equal single-process attention in
float64, through out and lse (GQA, dense heads, documents with prefix, sink and window);
stats bytes equal the cost hook's formula, entries counted on the dense mask, a closed
form, and the bytes the ring really sends."""
import torch
from hypothesis import assume, given, settings, strategies as st

import kernels
import parallel
import parallel.ring
from kernels import HeadStride, MaskSpec
from parallel.perf.cost import Layout, balancer_rows, bytes_sent
from parallel.ring import RingPlan
from parallel.ring_wire import block_need, seen_keys
from tests.distributed import run_ranks
from tests.kernels.cases import N_RANDOM as N, random_masks
from tests.parallel.cases import DOC_LENS, check, inputs

T = 64
S2 = HeadStride(block=4, local_blocks=2, vert_stride=2)


@settings(max_examples=80, deadline=None)
@given(random_masks(), st.integers(0, 10**6))
def test_needed_entries_equal_the_dense_mask(case, seed):
    """Entry (row k, head h) is needed exactly when some query of the set may see key k
    under head h; heads are given by global index (a subset, as usp holds)."""
    mask, args = case
    assume(mask.heads is not None)
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(N, generator=g)
    q_pos, k_pos = pos[: N // 3].sort().values, pos[N // 3:].sort().values
    heads = torch.randperm(args[-1] + 2, generator=g)[: args[-1]].sort().values
    allowed = mask.allowed(q_pos, k_pos, kv_heads=heads)  # [Hkv, Tq, Tk]
    want = allowed.any(1).t().flatten()
    assert torch.equal(block_need(mask, seen_keys(mask, q_pos, N), k_pos, heads), want)


def test_hops_carry_what_this_and_later_holders_need():
    """travel(j, t): entries some holder on hops t .. reach[j] needs; grads(j, t): entries
    some holder on hops 1 .. t needs (brute force on the dense mask; K/V heads 1 and 2)."""
    mask = MaskSpec.from_doc_lens(DOC_LENS, window=40, prefix=3, sink=2, heads=S2)
    heads = torch.tensor([1, 2])
    for balancer in ("headtail", "contiguous"):
        rows = [torch.as_tensor(r) for r in balancer_rows(balancer, T, 4, mask)]
        wire = RingPlan.build(mask, rows, 0, range(4)).wire(2, heads)
        for j in range(4):
            reach = wire.plan.reach[j]
            need = [mask.allowed(rows[(j + t) % 4], rows[j], kv_heads=heads).any(1).t().flatten() for t in range(4)]
            assert not any(n.any() for n in need[reach + 1:])
            for t in range(1, reach + 1):
                travel, grads = torch.stack(need[t:reach + 1]).any(0), torch.stack(need[1:t + 1]).any(0)
                assert torch.equal(wire.travel(j, t), travel.nonzero().flatten())
                assert torch.equal(wire.grads(j, t), grads.nonzero().flatten())
                assert (wire.entries(j, t), wire.acc_entries(j, t)) == (int(travel.sum()), int(grads.sum()))


def masks() -> dict[str, MaskSpec]:
    return {
        "s2": MaskSpec(causal=True, heads=S2),
        "s2-dense-head": MaskSpec(causal=True, heads=HeadStride(4, 1, 4, dense_heads=1)),
        "s2+documents+prefix+sink+window": MaskSpec.from_doc_lens(DOC_LENS, window=24, prefix=[3, 9, 5, 2], sink=1,
                                                                 heads=S2),
    }


def _record_sends(log):
    """Wrap the ring's p2p so every tensor it sends is logged as (tag, bytes)."""
    original = parallel.ring.p2p

    def p2p(sends=(), recvs=()):
        log.extend((tag, t.numel() * t.element_size()) for t, _, tag in sends)
        return original(sends, recvs)

    parallel.ring.p2p = p2p


def reference_with_lse(q, k, v, dout, dlse, mask):
    """Single-process out, lse and the gradients of a loss through both (every row of these
    masks sees itself, so lse is finite)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = kernels.attention(q, k, v, mask, backend="reference")
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _exact_and_bytes(rank, world, balancers, cases):
    log = []
    _record_sends(log)
    results = []
    for name, mask in masks().items():
        for hq, hkv, backend in cases:
            q, k, v, dout = inputs(T, hq, hkv, seed=len(results))
            dlse = torch.randn(hq, T, generator=torch.Generator().manual_seed(len(results)), dtype=torch.float64)
            want = reference_with_lse(q, k, v, dout, dlse, mask)
            for balancer in balancers:
                cp = parallel.build("ring", mask, T, balancer=balancer, backend=backend)
                ql, kl, vl = (cp.shard(x).clone().requires_grad_() for x in (q, k, v))
                log.clear()
                out, lse = cp.attention_with_lse(ql, kl, vl)
                sent_fwd = sum(b for _, b in log)
                ((out * cp.shard(dout)).sum() + (lse * dlse[:, cp.positions]).sum()).backward()
                sent_bwd = sum(b for _, b in log) - sent_fwd
                got = [cp.unshard(x) for x in (out.detach(), ql.grad, kl.grad, vl.grad)]
                lse_full = cp.unshard(lse.detach().t().contiguous()).t()
                label = f"ring/{balancer}/{name}/{hq}-{hkv}/{backend}"
                check(label, (got[0], lse_full, got[1], got[2], got[3]), want)
                stats = cp.stats
                assert stats.bytes_sent[rank] == sent_fwd, label
                assert stats.extra["bytes_bwd_sent"][rank] == sent_bwd, label
                lay = Layout(T, hq, hkv, 8, elem_bytes=8)
                formula = bytes_sent("ring", lay, world, mask=mask, rows=balancer_rows(balancer, T, world, mask))
                assert stats.bytes_sent == formula["fwd"] and stats.extra["bytes_bwd_sent"] == formula["bwd"]
                assert sum(stats.bytes_sent) == sum(stats.bytes_recv)
                results.append((label, stats.bytes_sent))
    return results


ENTRY = 2 * 8 * 8  # K and V of one row of one K/V head: 8 float64 dims each


def entries_sent(mask, rows, num_kv_heads):
    """Forward entries each ring position sends, from the dense mask alone: block j leaves
    hop t (position j + t) when a later hop needs some of it, carrying what those need."""
    n, heads = len(rows), torch.arange(num_kv_heads)
    sent = [0] * n
    for j in range(n):
        need = [mask.allowed(rows[(j + t) % n], rows[j], kv_heads=heads).any(1) for t in range(n)]
        for t in range(n - 1):
            sent[(j + t) % n] += int(torch.stack(need[t + 1:]).any(0).sum())
    return sent


def test_two_ranks_exact_and_bytes_match_formula_and_wire():
    cases = [(4, 2, "reference"), (4, 2, "cpu"), (4, 4, "reference"), (4, 4, "cpu")]
    results = run_ranks(_exact_and_bytes, 2, ["contiguous", "headtail"], cases)[0]
    assert len(results) == 3 * 4 * 2
    # contiguous, causal S2 (block 4, band 2 blocks, stride 2), K/V heads 2, 32 rows each:
    # rank 1 needs, of block 0's 8 S2 blocks, head 0 the even ones plus the band's block 7,
    # head 1 the odd ones (7 included): 5 * 4 + 4 * 4 = 36 entries of the 64 a whole block has
    assert dict(results)["ring/contiguous/s2/4-2/cpu"] == [36 * ENTRY, 0]


def test_four_ranks_exact_and_bytes_match_formula_and_wire():
    results = dict(run_ranks(_exact_and_bytes, 4, ["headtail"], [(4, 2, "cpu"), (8, 4, "reference")])[0])
    assert len(results) == 3 * 2
    for name, mask in masks().items():
        rows = [torch.as_tensor(r) for r in balancer_rows("headtail", T, 4, mask)]
        for hq, hkv, backend in ((4, 2, "cpu"), (8, 4, "reference")):
            want = [e * ENTRY for e in entries_sent(mask, rows, hkv)]
            assert results[f"ring/headtail/{name}/{hq}-{hkv}/{backend}"] == want, name
    # dense causal headtail: every rank passes 3 whole blocks of 16 rows x 2 K/V heads
    dense = bytes_sent("ring", Layout(T, 4, 2, 8, elem_bytes=8), 4)["fwd"]
    assert dense == [3 * 16 * 2 * ENTRY] * 4
    assert all(s2 < d for s2, d in zip(results["ring/headtail/s2/4-2/cpu"], dense))
