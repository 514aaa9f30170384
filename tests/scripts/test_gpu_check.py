"""The GPU check's own logic, on CPU: a wrong backend result fails its case, an exact one
passes, an exception is a failed case (not a crash), and asking for CUDA without it is a
clear error.  The GPU sections themselves run only where a GPU is lent."""
import pytest
import torch

from scripts import gpu_check


def test_cpu_backend_passes_every_mask_and_head_layout():
    cases = gpu_check.check_kernels(torch.device("cpu"), ["cpu"], [torch.float32], seqlen=64, head_dim=8)
    assert len(cases) == len(gpu_check.mask_catalogue(64)) * len(gpu_check.HEADS)
    assert all(c["ok"] for c in cases), [c for c in cases if not c["ok"]]


def test_a_wrong_result_fails_and_an_exception_is_a_failed_case():
    ref = [torch.randn(16, 4, 8, dtype=torch.float64) for _ in range(5)]
    assert gpu_check.compare(ref, ref, torch.float32)["ok"]
    off = [ref[0] * 1.01, *ref[1:]]
    result = gpu_check.compare(off, ref, torch.float32)
    assert not result["ok"] and result["errors"]["out"] > result["tolerance"]
    nan = [ref[0], ref[1], ref[2] * float("nan"), *ref[3:]]
    assert gpu_check.compare(nan, ref, torch.float32)["max_error"] == float("inf")

    def broken():
        raise RuntimeError("kernel launch failed")

    record = gpu_check.guarded({"backend": "x"}, broken)
    assert record["ok"] is False and "kernel launch failed" in record["error"]


def test_flash_skips_float32_instead_of_failing():
    cases = gpu_check.check_kernels(torch.device("cpu"), ["flash"], [torch.float32], seqlen=64, head_dim=8)
    assert cases and all(c["ok"] is None and "float32" in c["skipped"] for c in cases)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_is_a_clear_error(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--device cpu" in capsys.readouterr().err
