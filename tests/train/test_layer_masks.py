"""Per-layer masks (model.layer_masks): each layer computes under its own mask, the CP run
(one strategy per distinct mask over one layout) equals the single-process model in loss
and every gradient, one mask for every layer equals the plain run bitwise, and bad entries
fail with the setting named.  ONE spawn of 2 ranks runs every multi-rank case."""
import os

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import kernels
from models.llama import LayerMask, Llama, LlamaConfig, S2Heads
from models.rope import document_positions
from tests.distributed import run_ranks
from train.config import ParallelConfig, register
from train.layer_cp import LayerStrategies, hide_prefix_targets
from train.loop import Trainer, run, train
from train.validate import build_mask, layer_kinds, validate, validate_layer_masks

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
SEQLEN, DOC_LENS = 32, [13, 19]
# layer 0 and 3 global, 1 window + sinks, 2 S2 (2 KV heads, stride 2: they cover)
ENTRIES = [LayerMask(every=3, offset=0), LayerMask(layers=[1], window=5, sink=2),
           LayerMask(window=None, heads=S2Heads(block=4, local_blocks=1, vert_stride=2))]


class Train:
    mask, window = "document", None


def tiny_model(n_layers=4):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=23, dim=16, n_layers=n_layers, n_heads=4, n_kv_heads=2)).double()


def layer_masks(entries, n_layers=4):
    kinds, layer_mask = layer_kinds(Train, entries, n_layers)
    return [build_mask(DOC_LENS, Train, k) for k in kinds], layer_mask


def reference_attn(mask):
    pos = torch.arange(SEQLEN)
    return lambda q, k, v: kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos, backend="reference")[0]


def data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 23, (SEQLEN,), generator=g)
    labels = torch.randint(0, 23, (SEQLEN,), generator=g)
    return tokens, labels


def loss_and_grads(model, tokens, positions, attn, labels):
    model.zero_grad()
    loss = F.cross_entropy(model(tokens, positions, attn), labels, reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def single_process():
    masks, layer_mask = layer_masks(ENTRIES)
    tokens, labels = data()
    positions = document_positions(torch.arange(SEQLEN), masks[0].cu_doc_starts)
    return loss_and_grads(tiny_model(), tokens, positions, [reference_attn(masks[m]) for m in layer_mask], labels)


def test_layers_get_their_own_masks():
    masks, layer_mask = layer_masks(ENTRIES)
    assert layer_mask == [0, 1, 2, 0] and len(masks) == 3
    assert masks[1].window == 5 and masks[1].sink == 2 and masks[2].heads.vert_stride == 2
    assert masks[0].window is None and masks[0].heads is None and masks[0].has_docs
    model, (tokens, _) = tiny_model(), data()
    positions = document_positions(torch.arange(SEQLEN), masks[0].cu_doc_starts)
    global_attn, window_attn = reference_attn(masks[0]), reference_attn(masks[1])
    with torch.no_grad():
        one = model(tokens, positions, global_attn)
        assert torch.equal(model(tokens, positions, [global_attn] * 4), one)
        mixed = model(tokens, positions, [global_attn, window_attn, global_attn, global_attn])
        late = model(tokens, positions, [global_attn, global_attn, global_attn, window_attn])
    # the window hides keys from layer 1's late queries only; layer 3's window changes less
    assert not torch.allclose(mixed, one) and not torch.allclose(late, one) and not torch.allclose(mixed, late)
    assert torch.equal(mixed[:5], one[:5])  # the first 5 rows see no more than the window anyway
    with pytest.raises(ValueError, match="3 core attentions for 4 layers"):
        model(tokens, positions, [global_attn] * 3)


def test_prefix_targets_are_not_trained_on():
    mask = kernels.MaskSpec.from_doc_lens(DOC_LENS, causal=True, prefix=[4, 4])
    labels = torch.arange(SEQLEN)
    hidden = hide_prefix_targets(labels, mask, [{"prefix": None}, {"prefix": 4}, {"prefix": 2}])  # the longest
    # targets at document positions 1..3 (inside the prefix) are hidden; position 3 predicts 4
    assert (hidden == -100).nonzero().flatten().tolist() == [0, 1, 2, 13, 14, 15]
    assert hide_prefix_targets(labels, mask, [{"prefix": None}]) is labels


def cp_case(rank, world, strategy, options):
    torch.manual_seed(0)
    masks, layer_mask = layer_masks(ENTRIES)
    pcfg = ParallelConfig(strategy=strategy, options={"backend": "reference", **options})
    cps = LayerStrategies(masks, layer_mask, SEQLEN, pcfg)
    assert all(torch.equal(cp.index, cps.lead.index) for cp in cps.strategies)
    tokens, labels = data()
    positions = document_positions(cps.positions, cps.mask.cu_doc_starts)
    loss, grads = loss_and_grads(tiny_model(), cps.shard(tokens), positions, cps.attention, cps.shard(labels))
    torch.distributed.all_reduce(loss)
    for g in grads.values():
        torch.distributed.all_reduce(g)
    # plain numbers and arrays: tensors would travel back through shared memory of an exited rank
    return loss.item(), {n: g.numpy() for n, g in grads.items()}, cps.describe()


def auto_pinned_to_the_lead_layout(rank, world):
    """auto with predictions rigged so that the global mask (the lead: layers 0 and 3) picks
    ring on contiguous rows and the window mask would pick ulysses, which shards per_doc:
    the window mask must then be chosen among ring only, on the lead's rows."""
    import parallel.auto as auto

    def rigged(strategy, balancer, options, mask, *rest):
        if mask.window is None:
            return 1.0 if (strategy, balancer) == ("ring", "contiguous") else 2.0
        return 1.0 if strategy == "ulysses" else 2.0

    real, auto.predicted_time = auto.predicted_time, rigged
    auto._DECISIONS.clear()
    try:
        return cp_case(rank, world, "auto", AUTO)
    finally:
        auto.predicted_time = real
        auto._DECISIONS.clear()


def trainer_case(rank, world, cfg):
    trainer = Trainer(cfg)
    losses = [m["loss"] for m in train(trainer, None)]
    return losses, trainer.layer_cps.describe(), [type(cp).__name__ for cp in trainer.layer_cps.strategies]


def two_rank_cases(rank, world, cases, cfg):
    return ([cp_case(rank, world, *case) for case in cases] + [auto_pinned_to_the_lead_layout(rank, world)],
            trainer_case(rank, world, cfg))


def config(strategy, extra, out_dir):
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"parallel={strategy}", "+parallel.options.backend=reference", "data=synthetic", *extra,
            "model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seqlen=64", "train.steps=4", "train.device=cpu", "train.dtype=float32",
            "optim.warmup_steps=2", "train.progress=false", "logger=disabled", f"train.out_dir={out_dir}",
        ])
    return OmegaConf.to_object(cfg)


TRAIN_MASKS = ["model.layer_masks=[{layers: [1], window: 8, sink: 2}, {every: 3, offset: 2, prefix: 6}]"]
AUTO = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 4, "hardware": "h100"}


def test_two_ranks_equal_one_process_per_layer(tmp_path):
    ref_loss, ref_grads = single_process()
    cases = [("ring", {}), ("ulysses", {}), ("auto", AUTO)]
    baseline = [m["loss"] for m in run(config("none", TRAIN_MASKS, str(tmp_path)))]
    per_rank = run_ranks(two_rank_cases, 2, cases, config("ring", TRAIN_MASKS, str(tmp_path)))
    for rank_result in per_rank:
        assert len(rank_result[0]) == len(cases) + 1
        for (strategy, _), (loss, grads, described) in zip(cases + [("auto pinned", {})], rank_result[0]):
            assert loss == pytest.approx(ref_loss.item(), rel=1e-10), strategy
            for name, g in ref_grads.items():
                torch.testing.assert_close(torch.from_numpy(grads[name]), g, rtol=1e-9, atol=1e-11, msg=f"{strategy} {name}")
            assert len(described.splitlines()) == 3, described
        assert [line.split("-> ")[1] for line in described.splitlines()] == ["ring/contiguous"] * 3, described
        losses, described, kinds = rank_result[1]
        assert kinds == ["Ring", "Ring", "Ring"], described
        assert "window=8+sink=2" in described and "prefix<=6" in described
        assert losses == pytest.approx(baseline, abs=1e-5)


def test_one_mask_for_every_layer_is_the_plain_run_bitwise(tmp_path):
    window = ["train.mask=document+window", "train.window=8"]
    plain = [m["loss"] for m in run(config("none", window, str(tmp_path)))]
    same = [m["loss"] for m in run(config("none", ["model.layer_masks=[{window: 8}]"], str(tmp_path)))]
    assert same == plain
    different = [m["loss"] for m in run(config("none", ["model.layer_masks=[{every: 3, offset: 1, window: 8}]"],
                                               str(tmp_path)))]
    assert different != plain


@pytest.mark.parametrize("entry, message", [
    ({"windw": 8}, r"model.layer_masks\[0\].windw is not a layer mask setting"),
    ({"window": 0}, r"model.layer_masks\[0\].window=0 must be an int >= 1"),
    ({"sink": -1}, r"model.layer_masks\[0\].sink=-1"),
    ({"layers": [1, 4]}, r"model.layer_masks\[0\].layers=\[1, 4\] must list layer indices in 0..3"),
    ({"layers": [1], "every": 2}, r"model.layer_masks\[0\] sets both layers"),
    ({"every": 8, "offset": 5}, r"model.layer_masks\[0\].every=8, offset=5"),
    ({"heads": {"block": 4, "local_blocks": 1, "vert_stride": 4}}, r"model.layer_masks\[0\].heads: .*b % 4 in \[1, 2\]"),
    ({"heads": {"block": 4}}, r"model.layer_masks\[0\].heads=.*give block, local_blocks, vert_stride"),
    ({"heads": {"block": 0, "local_blocks": 1, "vert_stride": 1}}, r"model.layer_masks\[0\].heads: .*block=0"),
])
def test_bad_entries_name_the_setting(entry, message):
    with pytest.raises(ValueError, match=message):
        validate_layer_masks([entry], n_layers=4, n_kv_heads=2)


def test_s2_heads_need_tp_1():
    entry = {"heads": {"block": 4, "local_blocks": 1, "vert_stride": 2}}
    validate_layer_masks([entry], n_layers=4, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"model.layer_masks\[0\].heads \(S2\) with parallel.tp=2"):
        validate_layer_masks([entry], n_layers=4, n_kv_heads=2, tp=2)


def test_bad_entry_fails_in_validate_before_any_collective(tmp_path):
    cfg = config("ring", ["model.layer_masks=[{every: 2, offset: 1, window: 8}, {layers: [3]}]"], str(tmp_path))
    with pytest.raises(ValueError, match=r"model.layer_masks\[1\].layers=\[3\] .* \(model.n_layers=3\)"):
        validate(cfg, 2)


def test_hybrid_experiment_alternates_window_and_global_layers(tmp_path):
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=["experiment=hybrid_masks", "parallel=ring"]))
    validate(cfg, 2)
    kinds, layer_mask = layer_kinds(cfg.train, cfg.model.layer_masks, cfg.model.n_layers)
    assert layer_mask == [0, 0, 0, 1]
    assert kinds[0]["window"] == 256 and kinds[0]["sink"] == 4 and kinds[1]["window"] is None
