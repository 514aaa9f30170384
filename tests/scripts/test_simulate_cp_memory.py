"""`simulate_cp predict`'s training-step memory: the one formula (models.memory.predict_peak_bytes)
on seqlen / gpus tokens, and the same errors as training for bad memory options."""
import re

import pytest

from models.llama import LlamaConfig
from models.memory import MemoryOptions, predict_peak_bytes
from scripts.simulate_cp import main

SMALL = ["--hq", "8", "--hkv", "4", "--head-dim", "64", "--layers", "8", "--ffn-dim", "1376", "--vocab-size",
         "32000", "--tie-embeddings", "--hardware", "cpu", "--mask", "causal"]


def printed_peak(capsys) -> int:
    out = capsys.readouterr().out
    return int(re.search(r"peak ([\d,]+) bytes", out).group(1).replace(",", ""))


@pytest.mark.parametrize("gpus,options", [
    (1, MemoryOptions()),
    (2, MemoryOptions("selective", mlp_chunk=1024)),
    (4, MemoryOptions("full", loss_chunk=2048, mlp_chunk=2048)),
])
def test_predict_prints_predict_peak_bytes_per_rank(capsys, gpus, options):
    main(["predict", "--gpus", str(gpus), "--seqlen", "16384", *SMALL,
          "--activation-checkpoint", options.activation_checkpoint,
          "--loss-chunk", str(options.loss_chunk), "--mlp-chunk", str(options.mlp_chunk)])
    small = LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4)  # model=small
    assert printed_peak(capsys) == predict_peak_bytes(small, 16384 // gpus, options)


def training_error(**kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        MemoryOptions(**kwargs)
    return str(caught.value)


@pytest.mark.parametrize("flags,kwargs", [
    (["--activation-checkpoint", "most"], {"activation_checkpoint": "most"}),
    (["--loss-chunk", "-1"], {"loss_chunk": -1}),
    (["--mlp-chunk", "-2048"], {"mlp_chunk": -2048}),
])
def test_bad_memory_options_fail_like_training(capsys, flags, kwargs):
    with pytest.raises(SystemExit):
        main(["predict", *flags])
    assert training_error(**kwargs) in capsys.readouterr().err
