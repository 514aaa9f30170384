"""Hardware profiles: the sustained rates the time model prices work and traffic at.

A profile is a preset (GPU datasheet figures, the measured `cpu` profile of this project's
runner) or a JSON file written by `python -m scripts.simulate_cp calibrate RESULTS.jsonl
--save PROFILE.json`.  `resolve_hardware` is the one way every caller (`parallel=auto`,
`simulate_cp predict / straggle`) turns a name or a path into a `Hardware`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Hardware:
    """Sustained rates of one device and its links (SI units: FLOP/s, bytes/s, s)."""

    name: str
    fwd_flops: float            # sustained attention-kernel FLOP/s, forward
    bwd_flops: float            # sustained attention-kernel FLOP/s, backward
    mem_bw: float               # device memory bandwidth (merges, accumulations)
    intra_bw: float             # per direction, per device, inside a node
    intra_lat: float
    inter_bw: float             # per device, across nodes
    inter_lat: float
    devices_per_node: int = 8
    overlap: float = 1.0        # fraction of ring hop time hidden behind the block compute
    merge_passes: float = 6.0   # fp32 passes over the output per forward ring-step merge
    accum_passes: float = 2.0   # fp32 passes over dQ per backward ring-step accumulation
    call_overhead: float = 0.0  # fixed seconds per kernel call (launch / python)
    diag_fwd: float = 0.0       # seconds per row of a causal (diagonal) kernel tile per query head:
    diag_bwd: float = 0.0       # the kernel computes whole key blocks across the diagonal, so every
                                # document pays ~half a block of wasted keys per row (cpu backend)
    split_fwd: float = 0.0      # seconds per row per query head of a kernel call cut into several
    split_bwd: float = 0.0      # tiles (merging partials fwd, accumulating grads bwd; cpu backend)
    coll_bw: float = 0.0        # effective bytes/s per rank of all-gather / reduce-scatter and of
    a2a_bw: float = 0.0         # all-to-all, where they differ from p2p (gloo); 0 = the link's

    @property
    def tiled(self) -> bool:
        """Whether the profile prices how a tile-based kernel (cpu) cuts the work."""
        return bool(self.diag_fwd or self.diag_bwd or self.split_fwd or self.split_bwd)


# Figures: H100 SXM dense bf16 989 TFLOP/s and NVLink4 900 GB/s total = 450 GB/s per direction,
# HBM3 3.35 TB/s (NVIDIA H100 datasheet); H800 is the H100 die with NVLink cut to 400 GB/s total
# (200 per direction; NVIDIA H800 product brief); H200: same compute, HBM3e 4.8 TB/s (H200
# datasheet); InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one ConnectX-7 per GPU, DGX H100).
# Sustained attention rates: flash-attn 2 on H800, llama3-8B heads, 8K causal, measured by
# ring-flash-attention's README (591.5 fwd iter/s -> 325 TFLOP/s; 154.7 fwd+bwd iter/s -> 298
# TFLOP/s overall, i.e. ~289 TFLOP/s backward).  Latencies: ~10 us NCCL p2p intra-node,
# ~20 us across IB (NCCL tests, small messages).
H800 = Hardware("h800", 325e12, 289e12, 3.35e12, 200e9, 10e-6, 50e9, 20e-6)
H100 = replace(H800, name="h100", intra_bw=450e9)
H200 = replace(H100, name="h200", mem_bw=4.8e12)
# gloo on this project's 2-core CPU runner (one thread per rank, so no compute/communication
# overlap), from `python -m scripts.simulate_cp calibrate results.jsonl --fit-masks causal` on
# a quiet-machine run of the default bench matrix (scripts/BENCHMARKS.md, run Q1, checked on
# run Q2): kernel rate and per-row diagonal cost from the 1-rank cells, the in-CP rate share
# (0.92) from the causal 2-rank cells, p2p / all-gather+reduce-scatter / all-to-all bandwidths
# and the merge cost of a cut kernel call from the worker's probes.  Re-calibrate for another
# machine with `--save cpu.json` and pass `hardware=cpu.json`.
CPU = Hardware("cpu", fwd_flops=66.7e9, bwd_flops=64.7e9, mem_bw=10e9, intra_bw=3.09e9, intra_lat=7.2e-4,
               inter_bw=3.09e9, inter_lat=7.2e-4, devices_per_node=64, overlap=0.0, diag_fwd=9.70e-7,
               diag_bwd=1.64e-6, split_fwd=2.48e-7, split_bwd=6.4e-8, coll_bw=0.359e9, a2a_bw=1.11e9)
PRESETS = {h.name: h for h in (H100, H200, H800, CPU)}


def save_hardware(hw: Hardware, path: str) -> None:
    """Write a profile as JSON (what `scripts.simulate_cp calibrate --save` produces)."""
    with open(path, "w") as f:
        json.dump(asdict(hw), f, indent=2)
        f.write("\n")


def load_hardware(path: str) -> Hardware:
    """Read a JSON profile; unknown or missing fields name themselves in the error."""
    with open(path) as f:
        data = json.load(f)
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"hardware profile {path}: unknown field(s) {', '.join(unknown)}; "
                         f"a profile has {', '.join(sorted(known))}")
    try:
        return Hardware(**data)
    except TypeError as e:
        raise ValueError(f"hardware profile {path}: {e}; re-create it with scripts.simulate_cp calibrate --save") from e


def resolve_hardware(hw, setting: str = "hardware") -> Hardware:
    """A `Hardware`, a preset name, or the path of a JSON profile written by
    `python -m scripts.simulate_cp calibrate RESULTS.jsonl --save PROFILE.json`."""
    if isinstance(hw, Hardware):
        return hw
    if isinstance(hw, str) and hw.endswith(".json"):
        if not os.path.exists(hw):
            raise ValueError(f"{setting}={hw!r}: no such profile; write one with "
                             f"`python -m scripts.simulate_cp calibrate RESULTS.jsonl --save {hw}`")
        return load_hardware(hw)
    if hw not in PRESETS:
        raise ValueError(f"{setting}={hw!r} is unknown; choose one of {', '.join(PRESETS)} "
                         "or the path of a .json profile")
    return PRESETS[hw]
