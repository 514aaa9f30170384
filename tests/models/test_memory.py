"""Activation checkpointing, tiled MLP and chunked loss (models/memory.py) against the plain path.

Every combination gives the plain loss and gradients (float32); the chunked paths never
materialise [T, ffn] or [T, vocab] whole; `full` keeps only the block inputs; selective
runs core attention once per block, full twice; on 2 ranks, for every CP strategy, each
option gives the plain loss and gradients, and the bytes the strategy moves per step are
unchanged by selective and grow by exactly the forward's bytes with full.
"""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import MaskSpec
from models.llama import Llama, LlamaConfig
from models.memory import MemoryOptions
from tests.distributed import run_ranks

T, VOCAB, DOCS = 40, 50, [10, 20, 10]
CFG = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)  # ffn 96


def setup():
    torch.manual_seed(0)
    model = Llama(CFG)
    tokens, labels = torch.randint(0, VOCAB, (T,)), torch.randint(0, VOCAB, (T,))
    labels[[9, 29]] = -100
    pos, mask = torch.arange(T), MaskSpec.from_doc_lens(DOCS)
    calls = []

    def attn(q, k, v):
        calls.append(1)
        return kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos, backend="reference")[0]

    return model, tokens, labels, pos, attn, calls


def assert_grads_close(got_grads, want_grads):
    """float32 to 1e-6 of each tensor's largest entry (chunking reorders the sums)."""
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def loss_and_grads(model, tokens, labels, pos, attn, options):
    model.memory = options
    model.zero_grad()
    loss = model(tokens, pos, attn, labels=labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode,loss_chunk,mlp_chunk", itertools.product(["none", "selective", "full"], [0, 7], [0, 9]))
def test_same_loss_and_gradients(mode, loss_chunk, mlp_chunk):
    model, tokens, labels, pos, attn, calls = setup()
    want_loss, want_grads = loss_and_grads(model, tokens, labels, pos, attn, MemoryOptions())
    plain_calls = len(calls)
    calls.clear()
    loss, grads = loss_and_grads(model, tokens, labels, pos, attn, MemoryOptions(mode, loss_chunk, mlp_chunk))
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, want_grads)
    assert len(calls) == plain_calls * (2 if mode == "full" else 1)


def test_plain_call_still_returns_logits():
    model, tokens, labels, pos, attn, _ = setup()
    model.memory = MemoryOptions("full", loss_chunk=7, mlp_chunk=9)
    logits = model(tokens, pos, attn)
    assert logits.shape == (T, VOCAB)
    want = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(tokens, pos, attn, labels=labels), want, rtol=1e-6, atol=0)


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("chunked", [False, True])
def test_chunks_never_hold_whole_logits_or_mlp_intermediates(chunked):
    model, tokens, labels, pos, attn, _ = setup()
    model.memory = MemoryOptions("none", loss_chunk=7 * chunked, mlp_chunk=9 * chunked)
    with Shapes() as shapes:
        model(tokens, pos, attn, labels=labels).backward()
    whole = {(T, VOCAB), (T, CFG.hidden_dim)}
    assert (whole & shapes.seen == set()) == chunked
    if chunked:
        assert {(7, VOCAB), (9, CFG.hidden_dim)} <= shapes.seen


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_full_keeps_only_the_block_input(mode):
    """What a block leaves for the backward pass to outer saved-tensor hooks (where offload
    would move it): full leaves only its inputs; selective also core attention's tensors."""
    model, tokens, _, pos, attn, _ = setup()
    x = model.embed(tokens)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        MemoryOptions(mode).block(model.layers[0], x, pos, attn)
    float_elems = sum(t.numel() for t in packed if t.is_floating_point())
    if mode == "full":
        assert {t.data_ptr() for t in packed} == {x.data_ptr(), pos.data_ptr()}
    elif mode == "selective":  # x, q, k, v, out, lse and the reference kernel's probabilities
        assert x.data_ptr() in {t.data_ptr() for t in packed}
        assert float_elems < sum(t.numel() for t in packed_by_plain_block(model, x, pos, attn) if t.is_floating_point())


def packed_by_plain_block(model, x, pos, attn):
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        MemoryOptions().block(model.layers[0], x, pos, attn)
    return packed


@pytest.mark.parametrize("kwargs,setting", [
    ({"activation_checkpoint": "partial"}, "train.activation_checkpoint"),
    ({"loss_chunk": -1}, "train.loss_chunk"),
    ({"loss_chunk": 2.5}, "train.loss_chunk"),
    ({"mlp_chunk": True}, "train.mlp_chunk"),
    ({"mlp_chunk": "2048"}, "train.mlp_chunk"),
    ({"activation_offload": "yes"}, "train.activation_offload"),
])
def test_bad_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        MemoryOptions(**kwargs)


def test_offload_needs_cuda():
    with pytest.raises(ValueError, match="train.activation_offload=true .* needs CUDA"):
        MemoryOptions(activation_offload=True).check_device(torch.device("cpu"))


def count_comm_bytes():
    """Patch parallel.comm's collectives to count the bytes handed to them on this rank."""
    import torch.distributed as dist

    import parallel.comm as comm

    counted = [0]

    def nbytes(t):
        return t.numel() * t.element_size()

    p2p, gather, scatter, a2a = comm.p2p, comm._all_gather, comm._reduce_scatter, dist.all_to_all_single

    def counting_p2p(sends=(), recvs=()):
        counted[0] += sum(nbytes(t) for t, _, _ in sends)
        return p2p(sends, recvs)

    def wrap(fn):
        def counting(out, x, *args, **kwargs):
            counted[0] += nbytes(x)
            return fn(out, x, *args, **kwargs)
        return counting

    comm.p2p, comm._all_gather, comm._reduce_scatter = counting_p2p, wrap(gather), wrap(scatter)
    dist.all_to_all_single = wrap(a2a)
    return counted


STRATEGIES = {  # name -> (strategy, options); usp on 2 ranks is one of its two pure forms
    "ring": ("ring", {}),
    "ulysses": ("ulysses", {}),
    "allgather": ("allgather", {}),
    "usp ulysses 2 x ring 1": ("usp", {"ulysses_degree": 2, "ring_degree": 1}),
    "usp ulysses 1 x ring 2": ("usp", {"ulysses_degree": 1, "ring_degree": 2}),
    "cad": ("cad", {}),
}


def cp_each_rank(rank, world):
    import parallel

    counted = count_comm_bytes()
    results = {}
    for name, (strategy, options) in STRATEGIES.items():
        torch.manual_seed(0)
        model = Llama(CFG)
        tokens, labels = torch.randint(0, VOCAB, (T,)), torch.randint(0, VOCAB, (T,))
        mask = MaskSpec.from_doc_lens(DOCS)
        cp = parallel.build(strategy, mask, T, backend="reference", **options)
        args = cp.shard(tokens), cp.positions, cp.attention
        model.memory = MemoryOptions()
        counted[0] = 0
        model(*args, labels=cp.shard(labels))
        forward_bytes = counted[0]
        for mode in ("none", "selective", "full"):
            chunk = mode == "full"
            model.memory = MemoryOptions(mode, loss_chunk=7 * chunk, mlp_chunk=9 * chunk)
            model.zero_grad()
            counted[0] = 0
            loss = model(*args, labels=cp.shard(labels))
            loss.backward()
            grads = [p.grad.numpy().copy() for p in model.parameters()]  # numpy: pickled back by value
            results[name, mode] = (loss.item(), grads, counted[0])
        results[name, "forward"] = forward_bytes
    return results


def test_two_ranks_every_strategy_same_loss_and_grads_selective_same_bytes_full_repeats_the_forward():
    for rank_results in run_ranks(cp_each_rank, 2):
        for strategy in STRATEGIES:
            loss, grads, moved = rank_results[strategy, "none"]
            forward = rank_results[strategy, "forward"]
            assert 0 < forward < moved
            for mode in ("selective", "full"):
                got_loss, got_grads, got_moved = rank_results[strategy, mode]
                assert got_loss == pytest.approx(loss, rel=1e-6)
                assert_grads_close(map(torch.from_numpy, got_grads), map(torch.from_numpy, grads))
                repeats = MemoryOptions(mode).attention_forwards - 1  # what the training log counts
                assert got_moved == moved + forward * repeats, f"{strategy} {mode}"


def test_block_saved_values_count_what_autograd_keeps():
    """The formula's per-block count equals the bytes of the storages a plain block saves
    (the cpu kernel, the default on CPU; parameters excluded)."""
    from models.memory import block_saved_values

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, dim=64, n_layers=1, n_heads=4, n_kv_heads=2)
    model, t = Llama(cfg), 128
    pos, mask = torch.arange(t), MaskSpec.from_doc_lens([60, 68])
    x = model.embed(torch.randint(0, 50, (t,))).detach().requires_grad_()
    params = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(saved):
        if saved.data_ptr() not in params and saved.is_floating_point():
            storages[saved.untyped_storage().data_ptr()] = saved.untyped_storage().nbytes()
        return saved

    def attn(q, k, v):
        return kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos, backend="cpu")[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        model.layers[0](x, pos, attn)
    assert sum(storages.values()) == 4 * block_saved_values(cfg, t)
