"""The Hydra app: `python -m train ...` or `longctx-train ...`.

Composes conf/ over the schema in train/config.py, validates it, joins the process group
when launched by torchrun (train/dist.py: gloo on CPU, nccl on GPU; a single process
otherwise) and runs the loop. Errors are recorded for torchrun (`record`), so the failing
rank's error, with its rank and step, is the root cause the launcher prints last.

One torchrun job is one run folder: before Hydra composes, the ranks agree on the folder
through the torchrun agent's key-value store (the first to ask sets it, a restarted attempt
finds it again) and hand it to conf/config.yaml's hydra.run.dir in $LONGCTX_RUN_DIR; only
rank 0 writes Hydra's .hydra/ there and logs INFO (the other ranks log warnings and errors).
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import hydra

from . import quiet
from .config import CONF_DIR, RUN_DIR_ENV, register

RUN_DIR_KEY = "longctx/run_dir"


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    from . import dist
    from .loop import run

    record(dist.run_joined)(run, cfg)


def agree_on_run_dir() -> None:
    """Under torchrun (an agent store to meet in, no folder chosen yet): every rank proposes
    runs/<date>/<time> and takes the first proposal the store kept."""
    if RUN_DIR_ENV in os.environ or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    proposal = os.path.join("runs", time.strftime("%Y-%m-%d/%H-%M-%S"))
    os.environ[RUN_DIR_ENV] = store.compare_set(RUN_DIR_KEY, "", proposal).decode()


def main() -> None:
    register()
    quiet.install()
    agree_on_run_dir()
    if int(os.environ.get("RANK", "0")) > 0 and "-m" not in sys.argv and "--multirun" not in sys.argv:
        # rank 0 writes .hydra/ into the shared folder and reports; the others only warn
        sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.root.level=WARNING"]
    app()
