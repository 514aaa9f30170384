"""Test-only peers for the benchmark harness: one whose result is deliberately off, one
whose package is not installed."""
from scripts.peers.base import Peer
from scripts.peers.deepspeed_ulysses import DeepSpeedUlysses


class OffByOnePercent(DeepSpeedUlysses):
    """DeepSpeed Ulysses with its local attention's output scaled by 1.01: must be WRONG."""

    name = "fixture-wrong-peer"

    def local(self, q, k, v):
        return super().local(q, k, v) * 1.01


class NotInstalled(Peer):
    name = "fixture-missing-peer"
    needs = ("longctx_peer_that_is_not_installed",)
