import pytest

from tests.distributed import run_ranks


def _sum_ranks(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t)


def _fail_on_one(rank, world):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return rank


def test_all_reduce_over_two_ranks():
    assert run_ranks(_sum_ranks, 2) == [1.0, 1.0]


def test_failure_is_reported_with_rank():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_ranks(_fail_on_one, 2, timeout=60)
