"""Kernel tests run the triton backend under the Triton interpreter on CPU tensors.

The interpreter is chosen when `triton.jit` decorates the kernels, which happens when
kernels.triton_kernels is first imported (lazily, at the first triton call), so setting
the variable here, before any test runs, is enough; test_triton checks that it took.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest


@pytest.fixture(scope="module")
def monkeypatch_tiles():
    """Small cpu tiles so that short test sequences exercise runs, shifts and splits."""
    from kernels import cpu
    saved = cpu.TILE, cpu.MIN_RUN
    cpu.TILE, cpu.MIN_RUN = 8, 2
    yield
    cpu.TILE, cpu.MIN_RUN = saved
