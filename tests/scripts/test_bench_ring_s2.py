"""scripts.bench_ring_s2 bytes: S2 ring bytes per rank from the cost hook, against dense causal."""
import re

from scripts import bench_ring_s2


def test_bytes_mode_prints_s2_well_below_dense(capsys):
    bench_ring_s2.main(["bytes", "--seqlen", "4096", "--world", "4", "--block", "16", "--local-blocks", "4"])
    ratios = [float(x) for x in re.findall(r"max ratio ([0-9.]+)", capsys.readouterr().out)]
    assert len(ratios) == 4  # fwd and bwd, default and contiguous balancer
    assert all(0.05 < r < 0.25 for r in ratios)
