"""Bad CAD settings raise ValueError on every rank before any data collective (no hang)."""
from __future__ import annotations

import torch

from tests.distributed import run_ranks


def _errors(rank, world):
    import parallel
    from kernels import HeadStride, MaskSpec

    seen = []

    def expect(match, fn):
        try:
            fn()
        except ValueError as e:
            assert match in str(e), f"rank {rank}: {e!r} does not mention {match!r}"
            seen.append(match)
        else:
            raise AssertionError(f"rank {rank}: expected ValueError about {match!r}")

    mask = MaskSpec.from_doc_lens([3, 13])
    # ranks disagree on the documents: caught by the plan fingerprint all_gather
    other = MaskSpec.from_doc_lens([3, 13] if rank == 0 else [9, 7])
    expect("planned different tasks", lambda: parallel.build("cad", other, 16))
    # only rank 1 has a bad seqlen: rank 0 must raise too instead of hanging
    expect("seqlen" if rank == 1 else "rejected their settings",
           lambda: parallel.build("cad", MaskSpec(causal=True), 16 if rank == 0 else 15))
    # a document longer than the whole batch
    expect("every document must fit", lambda: parallel.build("cad", MaskSpec.from_doc_lens([40]), 16))
    expect("contiguous run", lambda: parallel.build("cad", MaskSpec(causal=True, doc_ids=torch.tensor([0] * 8 + [1] * 4 + [0] * 4)), 16))
    expect("epsilon", lambda: parallel.build("cad", mask, 16, epsilon=0))
    expect("balancer", lambda: parallel.build("cad", mask, 16, balancer="headtail"))
    cp = parallel.build("cad", mask, 16)
    q = torch.zeros(5, 2, 4)
    expect("8 local rows", lambda: cp.attention(q, q, q))
    s2 = MaskSpec.from_doc_lens([3, 13], heads=HeadStride(block=2, local_blocks=1, vert_stride=2))
    expect("pass num_kv_heads=", lambda: parallel.build("cad", s2, 16))  # S2 pairs are counted per KV head
    cp = parallel.build("cad", s2, 16, num_kv_heads=2)
    x = torch.zeros(8, 3, 4)
    expect("build it with num_kv_heads=3", lambda: cp.attention(x, x, x))
    return seen


def test_bad_settings_raise_on_every_rank():
    seen = run_ranks(_errors, 2)
    assert all(len(s) == 9 for s in seen)
