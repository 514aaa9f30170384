"""Known, harmless start-up messages of megatron-core and DeepSpeed on a CPU machine,
silenced by their text (or, for library INFO chatter, their logger); every other warning
and log line is kept.

- megatron-core: "Transformer Engine and Apex are not installed" (it falls back to torch)
  and its FSDP module's INFO lines about which backend it detected.
- DeepSpeed: the accelerator probe's "Setting accelerator to CPU" (we tell it: DS_ACCELERATOR
  =cpu when no CUDA device is visible), the shared-memory op's "built successfully" print,
  its deprecated all_gather_into_tensor call, and the compiler probes' gcc command lines
  (distutils INFO, shown only because the app logs INFO).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

import torch

KNOWN_WARNINGS = (
    (UserWarning, "Transformer Engine and Apex are not installed"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
)
CHATTY_LOGGERS = ("megatron.core.distributed.fsdp", "compilers.", "distutils")  # INFO and below dropped
KNOWN_PRINTS = ("deepspeed_shm_comm_op built successfully",)


class KnownNoise(logging.Filter):
    """For a handler: drops INFO (and below) from CHATTY_LOGGERS; keeps every warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(CHATTY_LOGGERS)


def install() -> None:
    for category, text in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=".*" + re.escape(text), category=category)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def known_prints():
    """Run a block whose library code prints known start-up lines; pass every other line on."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines(keepends=True):
            if not any(text in line for text in KNOWN_PRINTS):
                sys.stdout.write(line)
