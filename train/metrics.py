"""Throughput, MFU and memory: the numbers every step logs (names are stable).

MFU = model FLOPs per token (6N + core attention from the mask's pairs, 3.5x the
forward's 4 * pairs * Hq * D) * global tokens/s / (peak FLOP/s per rank * ranks).
"""
from __future__ import annotations

import resource
import sys

import torch

from parallel.cad.tasks import doc_pairs

# dense bf16 peak TFLOP/s per device, matched against torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def attention_pairs(doc_lens: list[int], seqlen: int, mask: str, window: int | None) -> int:
    """Allowed (query, key) pairs of one packed sequence under train.mask (train/validate.py's kinds)."""
    return doc_pairs(doc_lens if "document" in mask else [seqlen], window=int(window) if "window" in mask else None)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table for known GPUs, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def throughput(*, tokens: int, step_s: float, world: int, flops_per_token: float, peak: float | None) -> dict:
    tps = tokens / step_s
    out = {
        "tokens_per_s": tps,
        "tokens_per_s_per_rank": tps / world,
        "tflops": flops_per_token * tps / world / 1e12,
    }
    if peak:
        out["mfu"] = flops_per_token * tps / (peak * world)
    return out
