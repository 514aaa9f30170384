"""Damaged checkpoints are caught before loading and skipped for the newest good one.

Two ranks train 6 steps with a checkpoint every 2 (steps 2, 4, 6). Each case damages the
newest checkpoint (step 6) in one way; resume=auto must skip it with a warning naming the
file on rank 0, load step 4 on both ranks, and train steps 5..8 with exactly the losses of
a run resumed from step 4 by name. An explicitly named damaged checkpoint is an error.
"""
import logging
import os
import shutil

import torch.distributed as dist

from tests.distributed import run_ranks
from tests.train.test_resume import config
from train.checkpoint import damaged_files
from train.loop import run

DAMAGE = {
    "zeros in a shard": ("__0_0.distcp", lambda f: (f.seek(200), f.write(b"\0" * 8192))),
    "0x7f in another shard": ("__1_0.distcp", lambda f: (f.seek(100), f.write(b"\x7f" * 4096))),
    "truncated shard": ("__0_0.distcp", lambda f: f.truncate(1000)),
    "truncated client state": ("client_state.pt", lambda f: f.truncate(100)),
    "garbage in one rank's RNG file": ("rng/rank1.pt", lambda f: (f.seek(50), f.write(b"garbage"))),
    "missing manifest": ("MANIFEST.json", None),
}


def damage(folder, name, how):
    path = os.path.join(folder, name)
    if how is None:
        os.remove(path)
        return
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        how(f)
    assert os.path.getsize(path) <= size or name == "MANIFEST.json"


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def each_rank(rank, world, root):
    overrides = ["parallel.dp=2", "checkpoint=default", "checkpoint.every=2", "checkpoint.keep=3"]
    pristine = os.path.join(root, "pristine")
    run(config([*overrides, "train.steps=6", f"checkpoint.dir={pristine}"], os.path.join(root, "first")))
    step4 = os.path.join(pristine, "step_00000004")
    reference = run(config([*overrides, "train.steps=8", f"checkpoint.dir={root}/ref",
                            f"checkpoint.resume={step4}"], os.path.join(root, "ref_run")))
    handler = Collect()
    logging.getLogger("train.checkpoint").addHandler(handler)
    results = {}
    for i, (case, (name, how)) in enumerate(DAMAGE.items()):
        folder = os.path.join(root, f"case{i}")
        if rank == 0:
            shutil.copytree(pristine, folder)
            damage(os.path.join(folder, "step_00000006"), name, how)
        dist.barrier()
        found = damaged_files(os.path.join(folder, "step_00000006"), rank, world)
        named_error = None
        if i == 0:
            try:
                run(config([*overrides, "train.steps=8", f"checkpoint.dir={folder}/x",
                            f"checkpoint.resume={folder}/step_00000006"], os.path.join(root, "named")))
            except ValueError as e:
                named_error = str(e)
        handler.messages.clear()  # the run below saves a new step 6 over the damaged one
        resumed = run(config([*overrides, "train.steps=8", f"checkpoint.dir={folder}", "checkpoint.resume=auto"],
                             os.path.join(root, f"run{i}")))
        results[case] = ([(m["step"], m["loss"]) for m in resumed], list(handler.messages), found, named_error)
    return [(m["step"], m["loss"]) for m in reference], results


def test_damaged_newest_checkpoint_is_skipped_for_the_newest_good_one(tmp_path):
    (reference, results), (reference1, results1) = run_ranks(each_rank, 2, str(tmp_path), timeout=600)
    assert reference == reference1 and [s for s, _ in reference] == [5, 6, 7, 8]
    for i, (case, (name, _)) in enumerate(DAMAGE.items()):
        resumed, warnings, found, named_error = results[case]
        assert resumed == reference == results1[case][0], f"{case}: did not resume exactly from step 4"
        damaged = os.path.join("step_00000006", name)
        assert len(found) == 1 and damaged in found[0] and results1[case][2] == found, (case, found, results1[case][2])
        assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0] and damaged in warnings[0], \
            (case, warnings)
        assert results1[case][1] == [], "only rank 0 warns"
        if i == 0:  # a damaged checkpoint named by checkpoint.resume is an error, on every rank
            assert named_error and "is damaged" in named_error and damaged in named_error, named_error
            assert results1[case][3] == named_error
