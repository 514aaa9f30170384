"""Pack documents into fixed-length sequences, keeping their boundaries.

Invariant: the documents of epoch e, in the seeded order perm(seed, e), laid end to end
form one endless token stream; global sequence n is stream tokens [n*L, (n+1)*L), and a
document cut by a sequence edge continues as a new document in the next sequence.  So
a sequence is a pure function of (corpus, seed, L, n): data-parallel rank r of R takes
sequences r, r+R, r+2R, ..., every CP rank of one DP rank gets the same sequence, and
resuming needs only the count of sequences taken.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedSequence:
    index: int               # global sequence number
    tokens: torch.Tensor     # LongTensor [seqlen]
    doc_lens: list[int]      # lengths of the documents (pieces) in order, summing to seqlen


def next_token_labels(tokens: torch.Tensor, doc_lens: list[int] | None, ignore_index: int = -100) -> torch.Tensor:
    """labels[i] = tokens[i + 1]; ignore_index where i + 1 is past the sequence or, when
    document lengths are given, in another document."""
    labels = torch.full_like(tokens, ignore_index)
    labels[:-1] = tokens[1:]
    if doc_lens is not None:
        ends = torch.cumsum(torch.as_tensor(doc_lens, dtype=torch.long), 0) - 1
        labels[ends] = ignore_index
    return labels


class PackedLoader:
    """Endless iterator of PackedSequence for one data-parallel rank."""

    def __init__(self, corpus, seqlen: int, *, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        if seqlen < 2:
            raise ValueError(f"data.seqlen={seqlen} must be >= 2")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.corpus, self.seqlen, self.seed = corpus, seqlen, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch_tokens = int(corpus.lengths.sum())
        self.taken = 0
        self._epoch, self._order, self._starts = -1, None, None

    def _load_epoch(self, epoch: int):
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus.lengths))
            self._order = order
            self._starts = np.concatenate(([0], np.cumsum(self.corpus.lengths[order])))
            self._epoch = epoch

    def sequence(self, n: int) -> PackedSequence:
        """Global sequence n (independent of this loader's position)."""
        pieces, doc_lens = [], []
        pos, end = n * self.seqlen, (n + 1) * self.seqlen
        while pos < end:
            epoch, offset = divmod(pos, self.epoch_tokens)
            self._load_epoch(epoch)
            slot = int(np.searchsorted(self._starts, offset, side="right")) - 1
            doc = int(self._order[slot])
            start_in_doc = offset - int(self._starts[slot])
            take = min(int(self.corpus.lengths[doc]) - start_in_doc, end - pos)
            pieces.append(self.corpus.read(doc)[start_in_doc:start_in_doc + take])
            doc_lens.append(take)
            pos += take
        return PackedSequence(n, torch.from_numpy(np.concatenate(pieces)).long(), doc_lens)

    def __iter__(self):
        return self

    def __next__(self) -> PackedSequence:
        seq = self.sequence(self.dp_rank + self.dp_size * self.taken)
        self.taken += 1
        return seq

    def state_dict(self) -> dict:
        return {"taken": self.taken, "seqlen": self.seqlen, "seed": self.seed, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict):
        for key in ("seqlen", "seed", "dp_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    "resume with the same data settings and parallel degrees"
                )
        self.taken = int(state["taken"])
