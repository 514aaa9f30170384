"""Atomic, rotating checkpoints with automatic resume.

Layout under `checkpoint.dir`: one folder per checkpoint, `step_00000120/`, holding what
the engine writes (torch.distributed.checkpoint shards, or DeepSpeed's own files), every
rank's RNG states in `rng/rank<r>.pt`, a `MANIFEST.json` (size and sha256 of every other
file) and a `COMPLETE` marker.

Invariant: a folder named `step_<n>` with a `COMPLETE` marker is a whole checkpoint. All
ranks write into `.step_<n>.partial/`; after every rank has written and fsynced its files,
the ranks hash a share of the files each, rank 0 writes the manifest and then the marker,
fsyncs them and renames the folder into place (rename is atomic on POSIX), then fsyncs the
parent. A crash at any point leaves either the previous checkpoints untouched plus a hidden
partial folder (never resumed from, removed by the next save), or the new checkpoint
complete. Only then are checkpoints beyond the newest `keep` deleted.

Damage after the fact (a bad disk, a truncated copy, a file overwritten): with
checkpoint.verify (the default), every rank checks a share of the files against the
manifest before anything is loaded, and the ranks agree on the result (one all-gather).
`resume=auto` then takes the newest checkpoint that passes, with a warning naming each
damaged file it skipped; an explicitly named checkpoint that fails is an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
log = logging.getLogger(__name__)


def validate(cfg) -> None:
    """Check the checkpoint settings before any process group exists."""
    if cfg.every < 0:
        raise ValueError(f"checkpoint.every={cfg.every} must be >= 0 (0 disables saving)")
    if cfg.keep < 1:
        raise ValueError(f"checkpoint.keep={cfg.keep} must be >= 1")
    if cfg.resume in (None, "auto"):
        return
    if not os.path.isdir(cfg.resume):
        raise ValueError(
            f"checkpoint.resume={cfg.resume!r} does not exist; give a step_<n> folder written by a "
            f"previous run, 'auto' (newest in checkpoint.dir) or null (start fresh)"
        )
    if not is_complete(cfg.resume):
        raise ValueError(
            f"checkpoint.resume={cfg.resume!r} has no {MARKER} marker: it is not a finished checkpoint "
            f"(a save was interrupted); pick an earlier step_<n> folder"
        )


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    """Flush every file and folder under path to stable storage."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def _from_rank0(value):
    """Rank 0's value on every rank."""
    box = [value]
    if _joined():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not _joined():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(path: str) -> list[str]:
    """Every file of a checkpoint folder but the manifest and the marker, relative, sorted."""
    found = []
    for folder, _, files in os.walk(path):
        found += [os.path.relpath(os.path.join(folder, name), path) for name in files]
    return sorted(name for name in found if name not in (MANIFEST, MARKER))


def write_manifest(path: str, rank: int, world: int) -> None:
    """Hash the folder's files (rank r takes every world-th one) and write MANIFEST.json from
    rank 0. Collective: call on every rank once every rank's files are written."""
    names = _from_rank0(_payload_files(path) if rank == 0 else None)
    mine = {name: {"size": os.path.getsize(os.path.join(path, name)), "sha256": sha256(os.path.join(path, name))}
            for name in names[rank::world]}
    entries = {name: entry for part in _gather(mine) for name, entry in part.items()}
    if rank == 0:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump({"files": dict(sorted(entries.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def damaged_files(path: str, rank: int, world: int) -> list[str]:
    """What is wrong with a checkpoint folder ([] when every file matches its manifest), the
    same list on every rank; rank r hashes every world-th file. Collective."""
    problems = []
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{os.path.join(path, MANIFEST)} is missing or unreadable ({type(e).__name__}: {e})")
        files = {}
    for name in sorted(files)[rank::world]:
        full, want = os.path.join(path, name), files[name]
        if not os.path.isfile(full):
            problems.append(f"{full} is missing")
        elif os.path.getsize(full) != want["size"]:
            problems.append(f"{full} has {os.path.getsize(full)} bytes, the manifest says {want['size']}")
        elif sha256(full) != want["sha256"]:
            problems.append(f"{full} does not match its sha256 in the manifest (its contents changed)")
    return sorted({p for part in _gather(problems) for p in part})


class Checkpointer:
    """Saves every `cfg.every` steps into `cfg.dir`, keeps the newest `cfg.keep`, resumes
    from `cfg.resume` (a path, 'auto' for the newest complete one, or None)."""

    def __init__(self, cfg, rank: int, world: int, run_dir: str | None = None):
        validate(cfg)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.root = cfg.dir if os.path.isabs(cfg.dir) or run_dir is None else os.path.join(run_dir, cfg.dir)

    def resume(self, engine) -> dict | None:
        """Load the checkpoint cfg.resume names (or the newest, for 'auto') into engine and this
        rank's RNG; return its client state, or None when there is nothing to resume."""
        return self._load(self._choose(self.cfg.resume), engine)

    def rewind(self, engine) -> dict:
        """Load the newest complete checkpoint whatever cfg.resume says (faults.nan_policy=rewind)."""
        client_state = self._load(self._choose("auto"), engine)
        if client_state is None:
            raise FloatingPointError(f"faults.nan_policy=rewind found no complete checkpoint in {self.root} yet")
        return client_state

    def _load(self, path: str | None, engine) -> dict | None:
        if path is None:
            return None
        rng_file = os.path.join(path, "rng", f"rank{self.rank}.pt")
        try:
            client_state = engine.load(path)
            if os.path.isfile(rng_file):
                set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as e:
            hint = "" if self.cfg.verify else " (checkpoint.verify=true checks every file before loading)"
            raise RuntimeError(f"rank {self.rank} could not load checkpoint {path}: {type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}{hint}") from e
        return client_state

    def _choose(self, resume: str | None) -> str | None:
        """The checkpoint to load, the same on every rank: rank 0 lists the candidates, every
        rank verifies a share of each (checkpoint.verify), the newest good one wins."""
        if resume is None:
            return None
        if resume != "auto":
            problems = self._damage(resume)
            if problems:
                raise ValueError(f"checkpoint.resume={resume!r} is damaged: {'; '.join(problems)}. Resume from "
                                 f"another step_<n> folder, or checkpoint.verify=false to load it anyway")
            return resume
        candidates = _from_rank0([path for _, path in reversed(complete_checkpoints(self.root))]
                                 if self.rank == 0 else None)
        for path in candidates:
            problems = self._damage(path)
            if not problems:
                return path
            if self.rank == 0:
                log.warning("skipping damaged checkpoint %s: %s; falling back to an older one", path, "; ".join(problems))
        if candidates:
            raise ValueError(f"every checkpoint in {self.root} is damaged (see the warnings above); move them away "
                             f"to start fresh, or checkpoint.verify=false to load the newest anyway")
        return None

    def _damage(self, path: str) -> list[str]:
        return damaged_files(path, self.rank, self.world) if self.cfg.verify else []

    def maybe_save(self, step: int, engine, client_state_fn) -> str | None:
        if self.cfg.every and step % self.cfg.every == 0:
            return self.save(step, engine, client_state_fn())
        return None

    def save(self, step: int, engine, client_state: dict) -> str:
        final = os.path.join(self.root, f"step_{step:08d}")
        partial = os.path.join(self.root, f".step_{step:08d}.partial")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(os.path.join(partial, "rng"))
        _barrier()
        engine.save(partial, client_state)
        torch.save(rng_state(), os.path.join(partial, "rng", f"rank{self.rank}.pt"))
        _fsync_tree(partial)
        _barrier()
        write_manifest(partial, self.rank, self.world)
        if self.rank == 0:
            self._commit(partial, final, step)
            self._prune()
        _barrier()
        return final

    def _commit(self, partial: str, final: str, step: int) -> None:
        with open(os.path.join(partial, MARKER), "w") as f:
            json.dump({"step": step, "world": self.world, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        stale = None
        if os.path.exists(final):  # the same step saved again (e.g. after a rewind)
            stale = final + ".replaced"
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
        os.rename(partial, final)
        _fsync_dir(self.root)
        if stale:
            shutil.rmtree(stale)

    def _prune(self) -> None:
        for _, path in complete_checkpoints(self.root)[:-self.cfg.keep]:
            shutil.rmtree(path)
        for name in os.listdir(self.root):
            if name.startswith(".step_") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
