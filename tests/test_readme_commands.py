"""The README's training commands work as written, from a folder outside the clone.

Every `python -m train`, `torchrun ... -m train` and `scripts/train_local.sh` line of the
README is read from the README itself and run shortened: tiny shapes and 2 steps appended
as overrides, at most 2 ranks (a 4-rank example runs on 2, its degrees still valid there).
Each runs in its own empty folder with PYTHONPATH at the clone, and must exit 0 and leave
exactly ONE run folder holding .hydra/ and a train.log with the summary line. What a command
reads is made first in that folder: `data.path=` gets a prepared token folder, `model.path=`
a tiny Hugging Face checkpoint, `$NUMPY_DIR` the numpy sources; the command's own values of
the shortened settings give way to the short ones, and evaluation is off (`eval.every=0`).
Not run here: sbatch (tests/train/test_slurm.py, on a Slurm cluster), the submitit sweeps
(`-m`), and commands with settings that only a GPU has.
"""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHORT = ["train.steps=2", "data.seqlen=128", "model.dim=32", "model.n_layers=1", "train.progress=false",
         "logger=disabled", "eval.every=0"]
TRAINING = re.compile(r"^(python -m train|torchrun .*-m train|scripts/train_local\.sh) ?(.*)$")


# said in the README's prose: every engine also runs under a 1-process torchrun
PROSE = ["torchrun --nproc_per_node 1 -m train engine=deepspeed engine.options.zero_stage=2"]


def readme_commands() -> list[str]:
    """Training command lines from the README's bash blocks (comments and `-m` sweeps dropped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if TRAINING.match(line) and " -m hydra" not in line and "train -m " not in line and "--help" not in line:
                commands.append(line)
    return commands


def argv_for(command: str) -> list[str]:
    """The shortened command: 2 ranks at most, torchrun as `python -m torch.distributed.run`."""
    short_keys = {s.split("=")[0] for s in SHORT} | {"eval.passkey_lengths"}
    args = [a for a in shlex.split(command) if a.split("=")[0] not in short_keys]
    if args[0] == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
        i = args.index("--nproc_per_node") + 1
        args[i] = str(min(int(args[i]), 2))
    elif args[0] == "scripts/train_local.sh":
        args = [os.path.join(ROOT, args[0]), str(min(int(args[1]), 2)), *args[2:]]
    else:
        args = [sys.executable, *args[1:]]
    return [*args, *SHORT]


def test_the_readme_lists_the_commands_this_test_expects():
    commands = readme_commands()
    assert "python -m train" in commands
    assert any(c.startswith("torchrun --nproc_per_node 4 -m train parallel=usp") for c in commands)
    assert any(c.startswith("python -m train engine=deepspeed") for c in commands)
    assert any(c.startswith("scripts/train_local.sh") for c in commands)


def setting(command: str, key: str) -> str | None:
    found = re.search(rf"(?:^| ){re.escape(key)}=(\S+)", command)
    return found.group(1) if found else None


def prepare_inputs(command: str, folder, env) -> None:
    """Make what the command reads: a token folder for data.path, a tiny HF checkpoint for model.path."""
    tokens = setting(command, "data.path")
    if tokens:
        (folder / "my_texts").mkdir(exist_ok=True)
        for i in range(4):
            (folder / "my_texts" / f"{i}.txt").write_text(f"text {i} " + "lorem ipsum " * 40)
        subprocess.run([sys.executable, "-m", "scripts.prepare_data", "my_texts/", tokens], cwd=folder,
                       env=env, check=True, capture_output=True, timeout=120)
    checkpoint = setting(command, "model.path")
    if checkpoint:
        import torch

        from models.hf import save_pretrained
        from models.llama import Llama, LlamaConfig

        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, n_kv_heads=2))
        save_pretrained(model, folder / checkpoint.lstrip("/"))


@pytest.mark.parametrize("command", readme_commands() + PROSE)
def test_readme_command_trains_in_one_run_folder(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LONGCTX_RUN_DIR", "RANK", "WORLD_SIZE"))}
    env.pop("LONGCTX_DOCLENS", None)  # the packaged document lengths, as in a user's clone
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    command = command.replace("$NUMPY_DIR", os.path.dirname(__import__("numpy").__file__))
    prepare_inputs(command, tmp_path, env)
    checkpoint = setting(command, "model.path")
    if checkpoint and checkpoint.startswith("/"):  # an absolute example path: the tiny checkpoint made here
        command = command.replace(f"model.path={checkpoint}", f"model.path={tmp_path / checkpoint.lstrip('/')}")
    proc = subprocess.run(argv_for(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    folders = [os.path.dirname(p) for p in glob.glob(str(tmp_path / "**" / "train.log"), recursive=True)]
    assert len(folders) == 1, (folders, out[-2000:])
    assert os.path.isdir(os.path.join(folders[0], ".hydra"))
    log = open(os.path.join(folders[0], "train.log")).read()
    assert re.search(r"trained 2 steps: loss [0-9.]+ \(first step\) -> ", log), log[-2000:]
    assert "Transformer Engine and Apex are not installed" not in out and "Setting accelerator to CPU" not in out
