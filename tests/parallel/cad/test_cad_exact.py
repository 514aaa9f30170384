"""CAD on 2 and 4 gloo ranks equals single-process kernels.attention: out, dq, dk, dv
(float64; reference and cpu backends; plain and ping-pong dispatch)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks

MASKS = ("causal", "document", "window", "document+window", "bidirectional document")


def _mask(kind, doc_lens):
    from kernels import MaskSpec
    docs = "document" in kind
    window = 5 if "window" in kind else None
    if docs:
        return MaskSpec.from_doc_lens(doc_lens, causal=not kind.startswith("bidirectional"), window=window)
    return MaskSpec(causal=True, window=window)


def _cases(world):
    """Very uneven packed documents; one longer than a rank's share."""
    tpr = 12
    total = tpr * world
    long = tpr + 7
    return [[1, long, 3, total - long - 4], [total - 2, 1, 1], [2, 1, total - long - 3, long]]


def _check(rank, world, modes):
    import torch.distributed as dist

    import kernels
    import parallel
    from parallel.balance import imbalance

    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 8
    checked = 0
    for doc_lens in _cases(world):
        seqlen = sum(doc_lens)
        for kind in MASKS:
            for backend, pingpong in modes:
                mask = _mask(kind, doc_lens)
                g = torch.Generator().manual_seed(seqlen + len(kind))
                q = torch.randn(seqlen, hq, d, dtype=torch.float64, generator=g)
                k = torch.randn(seqlen, hkv, d, dtype=torch.float64, generator=g)
                v = torch.randn(seqlen, hkv, d, dtype=torch.float64, generator=g)
                dout = torch.randn(seqlen, hq, d, dtype=torch.float64, generator=g)
                ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
                ref_out, _ = kernels.attention(ref_q, ref_k, ref_v, mask, backend="reference")
                (ref_out * dout).sum().backward()

                cp = parallel.build("cad", mask, seqlen, backend=backend, pingpong=pingpong, epsilon=0.05,
                                    task_overhead_pairs=0)
                lq, lk, lv = (cp.shard(t).clone().requires_grad_() for t in (q, k, v))
                out = cp.attention(lq, lk, lv)
                (out * cp.shard(dout)).sum().backward()
                full = cp.unshard(out.detach())
                where = f"rank {rank} docs={doc_lens} mask={kind} backend={backend} pingpong={pingpong}"
                torch.testing.assert_close(full, ref_out.detach(), rtol=1e-10, atol=1e-10, msg=where)
                for name, got, ref in (("dq", lq, ref_q), ("dk", lk, ref_k), ("dv", lv, ref_v)):
                    torch.testing.assert_close(got.grad, cp.shard(ref.grad), rtol=1e-10, atol=1e-10,
                                               msg=f"{name} {where}")
                assert cp.positions.tolist() == list(range(rank * seqlen // world, (rank + 1) * seqlen // world))
                assert sum(cp.stats.pairs) == mask.pairs(torch.arange(seqlen), torch.arange(seqlen))
                assert cp.stats.imbalance("pairs") <= max(1.05, imbalance(cp.plan.pairs_before)) + 1e-9
                qb, kvb = hq * d * 8, 2 * hkv * d * 8  # float64 Q row, K+V row
                moved = sum(2 * n * qb for n in cp.plan.q_in_rows) + sum(n * kvb for n in cp.plan.kv_in_rows)
                assert sum(cp.stats.bytes_sent) == sum(cp.stats.bytes_recv) == moved  # Q, K/V in; out back
                if pingpong:
                    assert cp.stats.extra["pingpong_fwd_total_s"] > 0 and "pingpong_bwd_total_s" in cp.stats.extra
                checked += 1
    if world == 4:  # the trainer's pattern: a CP sub-group (ranks {0,1} and {2,3}), group-relative ranks
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mask = _mask("document", [5, 11, 4, 4])
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(24, h, d, dtype=torch.float64, generator=g) for h in (hq, hkv, hkv))
        cp = parallel.build("cad", mask, 24, group=groups[rank // 2], backend="reference", task_overhead_pairs=0)
        full = cp.unshard(cp.attention(cp.shard(q), cp.shard(k), cp.shard(v)))
        torch.testing.assert_close(full, kernels.attention(q, k, v, mask, backend="reference")[0], rtol=1e-10, atol=1e-10)
        checked += 1
    dist.barrier()
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_cad_matches_single_process(world):
    modes = (("reference", False), ("cpu", True))  # both backends, both dispatch paths
    counts = run_ranks(_check, world, modes)
    assert counts == [len(_cases(world)) * len(MASKS) * len(modes) + (world == 4)] * world


def _new_masks(rank, world):
    """Contract 1b masks (GQA 4/2, 32 tokens over 4 documents): exact out, lse, dq, dk, dv;
    pairs are each server's real per-KV-head pairs and received bytes the formula over the
    keys its queries need (brute force from MaskSpec.allowed with heads)."""
    import parallel
    from kernels import HeadStride, MaskSpec
    from parallel.cad import intervals as iv
    from tests.parallel.cases import check, inputs, reference, run_strategy

    doc_lens, hq, hkv, d = [5, 14, 9, 4], 4, 2, 8
    seqlen, tpr = sum(doc_lens), sum(doc_lens) // world
    masks = {
        "prefix": MaskSpec.from_doc_lens(doc_lens, causal=True, prefix=[2, 9, 0, 4]),
        "sink+window": MaskSpec.from_doc_lens(doc_lens, causal=True, window=3, sink=2),
        "s2+documents+dense head": MaskSpec.from_doc_lens(
            doc_lens, causal=True, heads=HeadStride(block=2, local_blocks=1, vert_stride=3, dense_heads=1)),
    }
    q, k, v, dout = inputs(seqlen, hq, hkv, d)
    everything = torch.arange(seqlen)
    names = []
    for name, mask in masks.items():
        want = reference(q, k, v, dout, mask)
        allowed = mask.allowed(everything, everything, hkv)
        per_head = allowed if mask.heads is not None else allowed[None].expand(hkv, -1, -1)
        for backend, pingpong in (("reference", False), ("cpu", True)):
            cp = parallel.build("cad", mask, seqlen, backend=backend, pingpong=pingpong, epsilon=0.05,
                                task_overhead_pairs=0, num_kv_heads=hkv)
            where = f"{name}/{backend}/pingpong={pingpong}"
            check(where, run_strategy(cp, q, k, v, dout), want)
            qb, kvb = hq * d * 8, 2 * hkv * d * 8
            owner = everything // tpr
            recv = [0] * world  # server s: its foreign Q and needed K/V rows; owner o: o's outputs served elsewhere
            for s in range(world):
                q_pos = iv.positions(cp.plan.q_rows[s])
                assert cp.stats.pairs[s] * hkv == int(per_head[:, q_pos].sum()), where
                needed = per_head[:, q_pos].any(0).any(0).nonzero().flatten()
                recv[s] += int((owner[q_pos] != s).sum()) * qb + int((owner[needed] != s).sum()) * kvb
                for o in owner[q_pos][owner[q_pos] != s].tolist():
                    recv[o] += qb
            assert cp.stats.bytes_recv == recv, where
            names.append(where)
    return names


def test_cad_on_prefix_sink_and_s2_masks():
    names = run_ranks(_new_masks, 2)
    assert all(len(n) == 3 * 2 for n in names)
