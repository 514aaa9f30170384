"""The model against published measurements (what `scripts.simulate_cp validate` prints)."""
from __future__ import annotations

from kernels import MaskSpec

from .cluster import LLAMA3_8B, throughput
from .cost import Layout, balancer_rows, mask_keys, pairs_per_rank
from .hardware import H200, H800
from .predict import predict


def ring_flash_attention_check() -> list[dict]:
    """zhuzilin/ring-flash-attention README, batch API, 8xH800, Llama-3-8B heads (32q/8kv,
    D=128), 8K tokens per GPU (64K global), causal, bf16: efficiency = ring iter/s /
    (flash_attn iter/s on 8K / 8).  Published: zigzag 85.2% fwd, 90.2% fwd+bwd; plain ring
    (contiguous) 52.1% / 53.9%."""
    p, t = 8, 8192 * 8
    lay, one = Layout(t, 32, 8, 128, 2), Layout(8192, 32, 8, 128, 2)
    mask = MaskSpec(causal=True)
    keys = mask_keys(mask, t)
    base = predict("none", [int(mask_keys(mask, 8192).sum())], one, H800)
    rows = []
    for balancer, pub_f, pub_t in (("headtail", 0.852, 0.902), ("contiguous", 0.521, 0.539)):
        ring = predict("ring", pairs_per_rank(keys, balancer_rows(balancer, t, p, mask)), lay, H800)
        for what, pub, key in (("fwd", pub_f, "fwd_s"), ("fwd+bwd", pub_t, "total_s")):
            rows.append(dict(case=f"ring-flash-attn {balancer} {what}, 8xH800, 64K causal", published=pub,
                             simulated=p * base[key] / ring[key]))
    return rows


def distca_check(docs: list[int], steps: int = 10) -> list[dict]:
    """DistCA (arXiv 2510.18121): up to 1.35x end-to-end throughput over WLB-ideal per-document
    CP on 512 H200 GPUs at 512K tokens.  Modelled as Llama-3-8B, TP=8 inside a node, one
    512K packed sequence (document lengths `docs`) per DP replica, each side at its best CP
    degree in {1, 2, 4, 8, 16}."""
    rows = []
    for gpus, tokens in ((512, 512 * 1024), (512, 256 * 1024), (128, 128 * 1024)):
        for hidden in (0.0, 1.0):
            best = {mode: max(throughput(docs, LLAMA3_8B, H200, gpus=gpus, tokens=tokens, tp=8, cp=cp, mode=mode,
                                         steps=steps, comm_hidden=hidden)
                              for cp in (1, 2, 4, 8, 16) if gpus // (8 * cp) >= 1)
                    for mode in ("wlb", "cad")}
            rows.append(dict(case=f"DistCA over WLB-ideal, {gpus} H200, {tokens // 1024}K, CP all-gather "
                                  f"{'exposed' if hidden == 0 else 'hidden'}",
                             published=1.35 if (gpus, tokens) == (512, 512 * 1024) else None,
                             simulated=best["cad"] / best["wlb"]))
    return rows
