"""Training data: corpora (stdlib text, token files, synthetic), tokenizers, and the
packing of documents into fixed-length sequences with their boundaries kept."""
from __future__ import annotations

from hydra.utils import to_absolute_path

from .corpus import StdlibCorpus, SyntheticCorpus, TokenFileCorpus
from .packing import PackedLoader, PackedSequence, next_token_labels
from .tokenizer import ByteTokenizer, load_tokenizer

SOURCES = ("stdlib", "synthetic", "tokens")


def build_corpus(cfg, seqlen: int, seed: int):
    """The corpus named by cfg.source (a DataConfig)."""
    if cfg.source == "stdlib":
        return StdlibCorpus(to_absolute_path(cfg.path) if cfg.path else None)
    if cfg.source == "tokens":
        if not cfg.path:
            raise ValueError("data.source=tokens needs data.path=<folder written by scripts/prepare_data.py>")
        return TokenFileCorpus(to_absolute_path(cfg.path))
    if cfg.source == "synthetic":
        doclens = to_absolute_path(cfg.doclens) if cfg.doclens else None
        return SyntheticCorpus(doclens, seqlen, cfg.doclens_context, cfg.vocab_size, seed, cfg.num_docs)
    raise ValueError(f"data.source={cfg.source!r} is unknown; choose one of {', '.join(SOURCES)}")


def build_loader(cfg, seed: int, dp_rank: int, dp_size: int) -> PackedLoader:
    corpus = build_corpus(cfg, cfg.seqlen, seed)
    return PackedLoader(corpus, cfg.seqlen, seed=seed, dp_rank=dp_rank, dp_size=dp_size)


__all__ = [
    "ByteTokenizer", "PackedLoader", "PackedSequence", "SOURCES", "StdlibCorpus", "SyntheticCorpus",
    "TokenFileCorpus", "build_corpus", "build_loader", "load_tokenizer", "next_token_labels",
]
