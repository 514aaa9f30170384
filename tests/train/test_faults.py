"""Non-finite loss policies and stop requests (single process; the multi-rank paths run in
test_resume.py and test_fault_restart.py)."""
import json
import math

import pytest

from train import faults
from train.config import CheckpointConfig, FaultsConfig


def test_raise_names_step_sequences_and_rank():
    guard = faults.LossGuard(FaultsConfig(nan_policy="raise"), rank=3)
    assert guard.check(2.5, 7, [14, 15], True) == "ok"
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 8; rank 3 trained on global sequences \[16, 17\], "
                                                 r"its local loss was NOT finite"):
        guard.check(math.nan, 8, [16, 17], False)


@pytest.mark.parametrize("policy", ["skip", "rewind"])
def test_carry_on_policies_stop_after_too_many_bad_steps_in_a_row(policy):
    guard = faults.LossGuard(FaultsConfig(nan_policy=policy, max_bad_steps=2))
    assert guard.check(math.inf, 1, [0], False) == policy
    assert guard.check(1.0, 2, [1], True) == "ok"  # a good step resets the count
    assert guard.check(math.nan, 3, [2], False) == policy
    assert guard.check(math.nan, 4, [3], False) == policy
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row exceed faults.max_bad_steps=2"):
        guard.check(math.nan, 5, [4], False)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="faults.nan_policy='ignore' is unknown"):
        faults.validate(FaultsConfig(nan_policy="ignore"), CheckpointConfig())
    with pytest.raises(ValueError, match="needs checkpoint.every > 0"):
        faults.validate(FaultsConfig(nan_policy="rewind"), CheckpointConfig(every=0))
    with pytest.raises(ValueError, match="faults.max_bad_steps=0"):
        faults.validate(FaultsConfig(max_bad_steps=0), CheckpointConfig())


def test_stop_request_follows_the_stop_file(tmp_path, monkeypatch):
    stop = tmp_path / "STOP"
    monkeypatch.setenv(faults.STOP_FILE_ENV, str(stop))
    request = faults.StopRequest()
    assert not request.requested()
    stop.touch()
    assert request.requested()
    monkeypatch.delenv(faults.STOP_FILE_ENV)
    assert not faults.StopRequest().requested()


def test_inject_is_checked_and_fires_only_on_its_rank_and_step():
    with pytest.raises(ValueError, match=r"faults.inject='boom' must look like raise@<rank>:<step>"):
        faults.validate(FaultsConfig(inject="boom"), CheckpointConfig())
    cfg = FaultsConfig(inject="raise@1:3")
    faults.validate(cfg, CheckpointConfig())
    for rank, step in [(0, 3), (1, 2), (1, 4)]:
        faults.begin_step(cfg, rank, step)
    with pytest.raises(faults.InjectedFault, match="rank 1 raised at step 3"):
        faults.begin_step(cfg, 1, 3)


def test_root_cause_is_the_earliest_error_record(tmp_path):
    def record(name, timestamp, *lines):
        callstack = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise E\n" + "\n".join(lines)
        (tmp_path / name).write_text(json.dumps({"message": {"message": lines[0], "extraInfo": {
            "py_callstack": callstack + "\n", "timestamp": str(timestamp)}}}))

    assert faults.root_cause(str(tmp_path)) is None
    record("node1.json", 200, "SignalException: Process 7 got signal: 15")
    record("node0.json", 100, "ValueError: bad", "[longctx] rank 1 failed at step 3")
    (tmp_path / "broken.json").write_text("{")
    assert faults.root_cause(str(tmp_path)) == ("root cause (torchrun's record node0.json, the earliest):\n"
                                                "  ValueError: bad\n  [longctx] rank 1 failed at step 3")
