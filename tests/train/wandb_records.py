"""Read an offline wandb run (the run-<id>.wandb transaction log) back, for tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
blocks of records (crc32 4 bytes, length 2, type 1: full / first / middle / last), each
record a serialized wandb `Record` protobuf.
"""
from __future__ import annotations

import glob
import os
import struct

BLOCK = 32768
HEADER = 7


def records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def offline_runs(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))


def read_run(path: str, wait_s: float = 30.0) -> dict:
    """{'history': [ {key: json value} per logged step ], 'config': {key: json value}, 'name': the last
    display name}.

    wandb's service may still be writing the log when run.finish() has returned; wait (up
    to wait_s) for the run's exit record."""
    import json
    import time

    deadline = time.time() + wait_s
    while not any(r.WhichOneof("record_type") == "exit" for r in records(path)) and time.time() < deadline:
        time.sleep(0.2)
    history, config, name = [], {}, None
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            name = r.run.display_name or name
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return {"history": history, "config": config, "name": name}
