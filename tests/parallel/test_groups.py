"""The rank grid: degree validation (pure) and the groups a 4-rank world builds."""
import pytest

from parallel.groups import ParallelDims
from tests.distributed import run_ranks


def test_dp_is_derived_and_coordinates_follow_the_grid():
    dims = ParallelDims(8, tp=2, cp=2)
    assert dims.dp == 2 and dims.ulysses_degree == 1 and dims.ring_degree == 2
    assert [dims.coordinates(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    lists = dims.rank_lists()
    assert lists["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lists["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lists["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lists["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("inner, ulysses, ring", [(True, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
                                                  (False, [[0, 2], [1, 3]], [[0, 1], [2, 3]])])
def test_ulysses_ring_split_inside_cp(inner, ulysses, ring):
    dims = ParallelDims(4, cp=4, ulysses_degree=2, ulysses_inner=inner)
    assert dims.ring_degree == 2
    lists = dims.rank_lists()
    assert lists["ulysses"] == ulysses and lists["ring"] == ring
    for cp_rank in range(4):
        u, r = dims.cp_split(cp_rank)
        assert cp_rank in ulysses[r] and ulysses[r].index(cp_rank) == u
        assert cp_rank in ring[u] and ring[u].index(cp_rank) == r


@pytest.mark.parametrize("kwargs, setting", [
    (dict(world_size=8, tp=3), "world_size=8"),
    (dict(world_size=8, tp=2, cp=2, dp=4), "tp*cp*dp"),
    (dict(world_size=8, cp=4, ulysses_degree=3), "ulysses_degree=3"),
    (dict(world_size=8, cp=4, ulysses_degree=2, ring_degree=4), "ulysses_degree*ring_degree"),
    (dict(world_size=8, cp=0), "cp=0"),
    (dict(world_size=4, tp=1.5), "tp=1.5"),
])
def test_bad_degrees_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting.replace("*", r"\*")):
        ParallelDims(**kwargs)


def _build_and_report(rank, world):
    import torch.distributed as dist

    g = ParallelDims(world, tp=1, cp=2, ulysses_degree=2).build()
    names = ("tp", "cp", "dp", "dp_cp", "ulysses", "ring")
    members = {n: dist.get_process_group_ranks(getattr(g, f"{n}_group")) for n in names}
    return members, (g.dp_rank, g.cp_rank, g.tp_rank, g.ulysses_rank, g.ring_rank)


def test_four_rank_build_memberships():
    results = run_ranks(_build_and_report, 4)
    for rank, (members, coords) in enumerate(results):
        dp, cp = divmod(rank, 2)
        assert coords == (dp, cp, 0, cp, 0)
        assert members["tp"] == [rank]
        assert members["cp"] == members["ulysses"] == [2 * dp, 2 * dp + 1]
        assert members["ring"] == [rank]
        assert members["dp"] == [cp, cp + 2]
        assert members["dp_cp"] == [0, 1, 2, 3]


def _strategies_on_cp_subgroups(rank, world):
    import parallel
    from tests.parallel.cases import check, inputs, masks, reference, run_strategy

    groups = ParallelDims(world, cp=2, ulysses_degree=2).build()
    mask = masks(64)["document"]
    q, k, v, dout = inputs(64, 4, 2, seed=groups.dp_rank)  # each DP replica its own data
    want = reference(q, k, v, dout, mask)
    for strategy, where in [("ring", {"group": groups.cp_group}), ("allgather", {"mesh": groups}),
                            ("ulysses", {"mesh": groups}), ("usp", {"mesh": groups, "ulysses_degree": 2})]:
        cp = parallel.build(strategy, mask, 64, backend="reference", **where)
        assert cp.world == 2 and cp.rank == groups.cp_rank
        check(f"{strategy} on dp={groups.dp_rank}", run_strategy(cp, q, k, v, dout), want)
    return True


def test_strategies_run_on_cp_subgroups_of_a_dp_by_cp_grid():
    assert run_ranks(_strategies_on_cp_subgroups, 4) == [True] * 4
