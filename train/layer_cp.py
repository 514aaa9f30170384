"""Per-layer masks under context parallelism: one CP strategy per distinct layer mask, all
over ONE shard layout, so the hidden states are sharded once (shard, positions and RoPE
from the lead strategy) and every layer's core attention runs on the same local rows.

The lead is the strategy of the mask most layers use (ties: the lowest layer) and is built
as `parallel.*` asks; its balancer fixes the layout.  The other masks get parallel.balancer
as given: a strategy's default balancer depends only on causality and documents, which
every layer mask shares, so they land on the lead's rows.  parallel=auto chooses per mask
among candidates on the lead's balancer; where its pick would lay the rows out differently
(a candidate that keeps its own default balancer), that mask is chosen among the lead's
strategy only.  Every layout is then checked equal to the lead's: the layouts are pure
functions of the config, so a mismatch raises the same ValueError on every rank.
"""
from __future__ import annotations

from collections import Counter

import torch

import parallel
from kernels import MaskSpec
from models.rope import document_positions
from parallel.auto import parse_choice
from parallel.balance import pair_counts
from parallel.base import CPStats


def same_layout(a, b) -> bool:
    return len(a.indices) == len(b.indices) and all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


class LayerStrategies:
    """`masks[m]` for the layers with `layer_mask[layer] == m`; `attention` is the lead's
    callable when there is one mask (exactly the plain path), else one callable per layer."""

    def __init__(self, masks: list[MaskSpec], layer_mask: list[int], seqlen: int, pcfg, *, group=None, mesh=None):
        self.masks, self.layer_mask = masks, layer_mask
        self.layers = Counter(layer_mask)
        lead = max(range(len(masks)), key=lambda m: (self.layers[m], -layer_mask.index(m)))
        build = dict(seqlen=seqlen, group=group, mesh=mesh)
        self.lead = parallel.build(pcfg.strategy, masks[lead], balancer=pcfg.balancer, **build, **pcfg.options)
        choice = getattr(self.lead, "choice", None)  # parallel=auto's pick
        self.strategies = []
        for m, mask in enumerate(masks):
            if m == lead:
                self.strategies.append(self.lead)
                continue
            balancer = self.lead.balancer if choice else pcfg.balancer
            cp = parallel.build(pcfg.strategy, mask, balancer=balancer, **build, **pcfg.options)
            if choice and not same_layout(cp, self.lead):
                only_lead = {**pcfg.options, "candidates": (parse_choice(choice)[0],)}
                cp = parallel.build(pcfg.strategy, mask, balancer=balancer, **build, **only_lead)
            if not same_layout(cp, self.lead):
                raise ValueError(f"model.layer_masks: the strategy for {describe(mask)} shards the sequence with "
                                 f"balancer {cp.balancer!r}, the one for {describe(masks[lead])} with "
                                 f"{self.lead.balancer!r}; set parallel.balancer so every layer shares one layout")
            self.strategies.append(cp)
        self.attention = self.lead.attention if len(masks) == 1 else [self.strategies[m].attention for m in layer_mask]
        self.mask, self.positions = self.lead.mask, self.lead.positions
        self.shard, self.unshard = self.lead.shard, self.lead.unshard

    def rope_positions(self) -> torch.Tensor:
        """RoPE turns at document-relative positions; the masks keep the global ones."""
        return document_positions(self.positions, self.mask.cu_doc_starts)

    @property
    def stats(self) -> CPStats:
        """The lead's stats with one mask; else every per-rank list averaged over the layers
        (the work and bytes of an average layer's attention call)."""
        if len(self.strategies) == 1:
            return self.lead.stats
        weights = [self.layers[m] / len(self.layer_mask) for m in range(len(self.masks))]
        every = [s.stats for s in self.strategies]

        def mean(lists):
            if any(not isinstance(x, list) or len(x) != len(lists[0]) for x in lists):
                return None
            return [sum(w * x[r] for w, x in zip(weights, lists)) for r in range(len(lists[0]))]

        lists = {k: mean([getattr(s, k) for s in every]) for k in ("bytes_sent", "bytes_recv", "pairs")}
        extra = {k: mean([s.extra.get(k) for s in every]) for k in every[0].extra}
        return CPStats(**{k: v or [] for k, v in lists.items()}, extra={k: v for k, v in extra.items() if v})

    def mean_pairs(self) -> float:
        """Allowed (query, key) pairs of an average layer (S2: pairs some head allows)."""
        everything = torch.arange(self.lead.seqlen)
        pairs = [pair_counts(mask, everything, everything) for mask in self.masks]
        return sum(self.layers[m] * pairs[m] for m in range(len(self.masks))) / len(self.layer_mask)

    def describe(self) -> str:
        """One line per mask: its layers, kinds and the strategy that computes it."""
        lines = []
        for m, (mask, cp) in enumerate(zip(self.masks, self.strategies)):
            layers = [layer for layer, k in enumerate(self.layer_mask) if k == m]
            how = getattr(cp, "choice", None) or f"{cp.name}/{cp.balancer}"
            lines.append(f"layers {layers}: {describe(mask)} -> {how}")
        return "\n".join(lines)


def describe(mask: MaskSpec) -> str:
    """A mask's kinds without what changes every sequence (document count, per-document prefixes)."""
    parts = [part for part in mask.describe().split("+") if not part.startswith(("docs=", "prefix="))]
    if mask.prefix is not None:
        parts.append(f"prefix<={max(mask.prefix) if isinstance(mask.prefix, list) else mask.prefix}")
    return "+".join(parts + ["documents"] * mask.has_docs)


def hide_prefix_targets(labels: torch.Tensor, mask: MaskSpec, mask_kinds: list[dict]) -> torch.Tensor:
    """labels with -100 where the target lies inside its document's first `prefix` tokens,
    the longest prefix of any layer's kinds (`layer_kinds`): a layer with a bidirectional
    prefix lets those rows see their targets.  No prefix: labels as they are."""
    prefix = max(kinds["prefix"] or 0 for kinds in mask_kinds)
    if not prefix:
        return labels
    relative = document_positions(torch.arange(labels.numel()), mask.cu_doc_starts)
    return labels.masked_fill(relative + 1 < prefix, -100)
