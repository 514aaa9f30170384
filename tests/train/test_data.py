"""Packing, determinism, DP sharding, exact resume, the corpora and prepare_data."""
import json
import sys

import numpy as np
import pytest
import torch

from scripts.prepare_data import prepare
from train.data import (ByteTokenizer, PackedLoader, StdlibCorpus, SyntheticCorpus, TokenFileCorpus,
                        next_token_labels)


class ListCorpus:
    """Documents given as lists; document d's tokens are all 1000 + d, so any token says
    which document it came from."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.vocab_size = 2000

    def read(self, i):
        return np.full(int(self.lengths[i]), 1000 + i, dtype=np.int64)


def test_packing_keeps_document_boundaries_across_epochs():
    corpus = ListCorpus([5, 1, 9, 3, 30, 2])
    loader = PackedLoader(corpus, 8, seed=3)
    stream = []
    for _ in range(20):  # 160 tokens: more than three epochs of 50
        seq = next(loader)
        assert seq.tokens.shape == (8,) and sum(seq.doc_lens) == 8
        pieces = torch.split(seq.tokens, seq.doc_lens)
        for piece in pieces:
            assert piece.unique().numel() == 1  # a piece never mixes documents
        stream.extend(seq.tokens.tolist())
    for epoch in range(3):
        chunk = stream[epoch * 50:(epoch + 1) * 50]
        docs = [d for i, d in enumerate(chunk) if i == 0 or chunk[i - 1] != d]
        assert sorted(d - 1000 for d in docs) == list(range(6))  # every document once per epoch
        assert all(chunk.count(1000 + d) == corpus.lengths[d] for d in range(6))


def test_labels_stop_at_document_ends():
    tokens = torch.arange(10, 16)
    labels = next_token_labels(tokens, [2, 4])
    assert labels.tolist() == [11, -100, 13, 14, 15, -100]
    assert next_token_labels(tokens, None).tolist() == [11, 12, 13, 14, 15, -100]


def test_deterministic_and_dp_ranks_partition_the_sequences():
    corpus = ListCorpus(np.arange(1, 40))
    a, b = PackedLoader(corpus, 16, seed=7), PackedLoader(corpus, 16, seed=7)
    for _ in range(60):  # past the first epoch (780 tokens)
        torch.testing.assert_close(next(a).tokens, next(b).tokens)
    full = PackedLoader(corpus, 16, seed=7)
    seqs = [next(full).tokens for _ in range(6)]
    ranks = [PackedLoader(corpus, 16, seed=7, dp_rank=r, dp_size=3) for r in range(3)]
    for k in range(2):
        for r in range(3):
            torch.testing.assert_close(next(ranks[r]).tokens, seqs[3 * k + r])
    other_seed = next(PackedLoader(corpus, 16, seed=8)).tokens
    assert not torch.equal(other_seed, seqs[0])


def test_resume_continues_exactly():
    corpus = ListCorpus(np.arange(3, 50))
    a = PackedLoader(corpus, 32, seed=1, dp_rank=1, dp_size=2)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]
    b = PackedLoader(corpus, 32, seed=1, dp_rank=1, dp_size=2)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        assert got.index == want.index and got.doc_lens == want.doc_lens
        torch.testing.assert_close(got.tokens, want.tokens)
    with pytest.raises(ValueError, match="seqlen"):
        PackedLoader(corpus, 64, seed=1, dp_rank=1, dp_size=2).load_state_dict(state)


def test_stdlib_corpus_is_found_and_is_text():
    corpus = StdlibCorpus()
    assert len(corpus.lengths) > 100
    i = next(i for i, p in enumerate(corpus.files) if p.name == "textwrap.py")
    tokens = corpus.read(i)
    assert tokens.size == corpus.lengths[i] and tokens[-1] == ByteTokenizer.eos_id
    assert "def wrap(" in ByteTokenizer().decode(tokens)


def test_prepare_data_round_trip(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello world")
    (src / "sub" / "b.md").write_text("naïve text")
    (src / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (src / "skip.bin").write_bytes(b"\x00\x01")
    meta = prepare(str(src), str(tmp_path / "out"))
    assert meta["num_docs"] == 4 and meta["vocab_size"] == 257
    corpus = TokenFileCorpus(str(tmp_path / "out"))
    texts = [ByteTokenizer().decode(corpus.read(i)) for i in range(4)]
    assert texts == ["hello world", "one", "two", "naïve text"]  # sorted path order
    assert all(corpus.read(i)[-1] == 256 for i in range(4))
    loader = PackedLoader(corpus, 4)
    stream = torch.cat([next(loader).tokens for _ in range(meta["num_tokens"] // 4)])
    ends = (stream == 256).nonzero().flatten().tolist()
    texts_packed = [ByteTokenizer().decode(stream[a + 1:b + 1]) for a, b in zip([-1] + ends, ends)]
    assert sorted(texts_packed) == sorted(texts)  # one epoch, packed: every document once, intact


def test_prepare_data_names_missing_tokenizers_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="pip install tokenizers"):
        prepare(str(tmp_path), str(tmp_path / "out"), tokenizer="tokenizer.json")


def test_synthetic_lengths_follow_the_distribution(tmp_path):
    path = tmp_path / "lens.json"
    path.write_text(json.dumps([1000, 4000]))
    corpus = SyntheticCorpus(str(path), seqlen=64, context=1000, vocab_size=11, seed=0, num_docs=200)
    assert set(corpus.lengths.tolist()) == {64, 256}
    tokens = corpus.read(5)
    assert tokens.size == corpus.lengths[5] and tokens.max() < 11
    np.testing.assert_array_equal(tokens, SyntheticCorpus(str(path), 64, 1000, 11, 0, 200).read(5))
