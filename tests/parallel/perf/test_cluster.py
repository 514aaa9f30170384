"""DP / PP straggling from document-length imbalance (parallel.perf.cluster)."""
import random

import pytest

from parallel.perf.cluster import LLAMA3_8B, dp_step, pipeline_makespan, pp_dp_step, seq_times, straggle
from parallel.perf.hardware import H100


def _event_sim(times, stages):
    """Finish time of the last stage, stepped through microbatch by microbatch: a stage starts
    microbatch m when it has finished m - 1 and the stage before has finished m."""
    done = [0.0] * stages
    for t in times:
        prev = 0.0
        for s in range(stages):
            done[s] = max(done[s], prev) + t
            prev = done[s]
    return done[-1]


@pytest.mark.parametrize("seed", range(5))
def test_pipeline_makespan_matches_a_step_by_step_schedule(seed):
    rng = random.Random(seed)
    for stages in (1, 2, 4, 7):
        times = [rng.uniform(0.1, 3.0) for _ in range(rng.randint(1, 12))]
        assert pipeline_makespan(times, stages) == pytest.approx(_event_sim(times, stages), rel=1e-12)


def test_equal_microbatches_give_the_usual_bubble_and_a_long_one_is_paid_again_per_stage():
    assert pipeline_makespan([2.0] * 8, 4) == pytest.approx((8 + 4 - 1) * 2.0)
    # same total work, one microbatch twice as long: it costs (stages - 1) * 2 more, not 2
    assert pipeline_makespan([4.0] + [2.0] * 6, 4) - pipeline_makespan([2.0] * 8, 4) == pytest.approx(3 * 2.0)
    with pytest.raises(ValueError, match="stages"):
        pipeline_makespan([1.0], 0)


def test_without_pipeline_it_is_the_dp_step():
    seqs = [[65536, 65536], [8192] * 16, [131072]]
    for mode in ("per_doc_cp", "wlb", "cad"):
        got = pp_dp_step([[s] for s in seqs], LLAMA3_8B, H100, tp=8, cp=4, pp=1, mode=mode)
        ref = dp_step(seqs, LLAMA3_8B, H100, tp=8, cp=4, mode=mode)
        assert got["step_s"] == pytest.approx(ref["step_s"], rel=1e-12)
        assert got["dp_straggle"] == pytest.approx(ref["straggle"], rel=1e-12)


def test_long_documents_straggle_per_doc_cp_and_cad_removes_the_dp_part():
    short, long_ = [8192] * 16, [131072]
    batches = [[short, short, short, long_], [short] * 4]  # replica 0 holds one 128K document
    per = pp_dp_step(batches, LLAMA3_8B, H100, tp=8, cp=4, pp=4, mode="per_doc_cp")
    cad = pp_dp_step(batches, LLAMA3_8B, H100, tp=8, cp=4, pp=4, mode="cad")
    assert per["dp_straggle"] > 1.01 and per["pp_straggle"] > 1.01 and per["step_s"] > per["ideal_s"]
    # CAD pools each microbatch's attention over the replicas: no DP straggle, a shorter step;
    # but the microbatch with the long document is now longer on every replica, so the
    # pipeline still straggles (CAD balances a layer's attention, not the microbatches)
    assert cad["dp_straggle"] == pytest.approx(1.0) and cad["pp_straggle"] > 1.01
    assert cad["step_s"] < per["step_s"]
    # replica 0's makespan by hand: 1/pp of each microbatch's time per stage
    t = [x / 4 for x in (seq_times([short, short], LLAMA3_8B, H100, tp=8, cp=4, mode="per_doc_cp")[0],) * 3]
    t.append(seq_times([long_, short], LLAMA3_8B, H100, tp=8, cp=4, mode="per_doc_cp")[0] / 4)
    assert per["step_s"] == pytest.approx(sum(t) + 3 * max(t), rel=1e-12)
    assert per["bubble"] == pytest.approx((4 + 4 - 1) / 4)


def test_straggle_samples_batches_and_names_bad_shapes():
    docs = [1024, 4096, 16384, 65536, 2048, 512]
    r = straggle(docs, LLAMA3_8B, H100, gpus=64, tokens=32768, tp=8, cp=2, pp=2, microbatches=4, mode="per_doc_cp",
                 steps=3)
    assert r["dp"] == 2 and r["step_s"] >= r["ideal_s"] and r["loss"] >= 0 and r["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="tp x cp x pp"):
        straggle(docs, LLAMA3_8B, H100, gpus=60, tokens=32768, tp=8, cp=2, pp=2, microbatches=4, mode="cad")
    with pytest.raises(ValueError, match="microbatches"):
        straggle(docs, LLAMA3_8B, H100, gpus=64, tokens=32768, tp=8, cp=2, pp=2, microbatches=0, mode="cad")
