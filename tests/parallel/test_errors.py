"""Bad settings raise ValueError naming the setting on every rank, before any collective:
the ranks stay in step, so the group is still usable afterwards (nothing hangs)."""
import pytest
import torch

import parallel
from kernels import MaskSpec
from parallel.ulysses import HeadExchange
from tests.distributed import run_ranks

CAUSAL = MaskSpec(causal=True)


def _qkv(rows, hq=4, hkv=2, d=8):
    return torch.randn(rows, hq, d), torch.randn(rows, hkv, d), torch.randn(rows, hkv, d)


BAD = {
    "seqlen not divisible": (lambda: parallel.build("ring", CAUSAL, 62, balancer="headtail"), "seqlen"),
    "unknown strategy": (lambda: parallel.build("spiral", CAUSAL, 64), "strategy='spiral'"),
    "unknown balancer": (lambda: parallel.build("ring", CAUSAL, 64, balancer="zig"), "balancer='zig'"),
    "unknown option": (lambda: parallel.build("ring", CAUSAL, 64, ulysses_degree=2), "ulysses_degree"),
    "usp grid vs group": (lambda: parallel.build("usp", CAUSAL, 64, ulysses_degree=2, ring_degree=2),
                          "ulysses_degree\\*ring_degree"),
    "usp degree not dividing": (lambda: parallel.build("usp", CAUSAL, 64, ulysses_degree=3), "ulysses_degree=3"),
    "documents vs seqlen": (lambda: parallel.build("ring", MaskSpec.from_doc_lens([30, 30]), 64), "seqlen=64"),
    "ulysses heads": (lambda: _attend("ulysses", hq=3, hkv=1), "ulysses_degree=2 must divide the query heads Hq=3"),
    "usp heads": (lambda: _attend("usp", hq=3, hkv=1, ulysses_degree=2), "Hq=3"),
    "local rows": (lambda: parallel.build("ring", CAUSAL, 64).attention(*_qkv(16)), "local rows"),
    "kv head groups": (lambda: _attend("allgather", kv_head_groups=3), "kv_head_groups=3"),
}


def _attend(strategy, hq=4, hkv=2, **options):
    cp = parallel.build(strategy, CAUSAL, 64, backend="reference", **options)
    return cp.attention(*_qkv(32, hq, hkv))


def _every_rank_raises(rank, world):
    import re

    caught = {}
    for name, (call, match) in BAD.items():
        try:
            call()
            caught[name] = "no error"
        except ValueError as e:
            caught[name] = "ok" if re.search(match, str(e)) else f"wrong message: {e}"
    cp = parallel.build("ring", CAUSAL, 64, backend="reference")  # the group still works
    q, k, v = (cp.shard(t) for t in _qkv(64))
    cp.attention(q, k, v)
    return caught


def test_every_rank_raises_value_error_and_nothing_hangs():
    for rank_result in run_ranks(_every_rank_raises, 2, timeout=120):
        assert rank_result == {name: "ok" for name in BAD}


def test_any_degree_dividing_hq_serves_any_hkv():
    for degree, hq, hkv, rep in [(4, 8, 2, 2), (4, 12, 3, 4), (2, 4, 4, 1), (8, 8, 1, 8)]:
        assert HeadExchange(list(range(degree)), 0, None).kv_repeats(hq, hkv) == rep
    with pytest.raises(ValueError, match="ulysses_degree=4 must divide the query heads Hq=6"):
        HeadExchange(list(range(4)), 0, None).kv_repeats(6, 2)
