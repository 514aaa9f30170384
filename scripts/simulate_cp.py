"""Cluster simulator CLI over `parallel.perf` (the performance model).

    python -m scripts.simulate_cp validate                 # published figures vs the model
    python -m scripts.simulate_cp predict --gpus 64 --seqlen 1048576 --hardware h100
    python -m scripts.simulate_cp predict --gpus 1 --seqlen 262144 --hq 8 --hkv 4 --head-dim 64 --layers 8 \
        --ffn-dim 1376 --vocab-size 32000 --tie-embeddings --activation-checkpoint full \
        --loss-chunk 2048 --mlp-chunk 2048     # model=small's shape, one process
    python -m scripts.simulate_cp straggle --gpus 256 --tp 8 --cp 4 --pp 4
    python -m scripts.simulate_cp calibrate bench_out/results.jsonl --save cpu.json   # measured vs predicted

`--hardware` takes a preset (h100, h200, h800, cpu) or a profile written by `calibrate --save`.
`calibrate` fits a CPU `Hardware` from the bench JSONL without looking at any multi-rank
time: the kernel rate comes from the 1-rank cell of the same shape, the link from the gloo
probe the worker records (`link_bw`, `link_lat`); then it predicts every P-rank cell.
`predict` also prints one training step's peak memory per rank from
`models.memory.predict_peak_bytes` (the formula behind `scripts.bench_memory`) for the model
shape (--hq x --head-dim wide, --layers, --ffn-dim, --vocab-size) on seqlen / gpus tokens
under the train.* memory options (--activation-checkpoint, --loss-chunk, --mlp-chunk).
Document lengths: `--doclens`, else $LONGCTX_DOCLENS, else the packaged ProLong mix.
"""
from __future__ import annotations

import argparse

from models.llama import LlamaConfig
from models.memory import MemoryOptions, predict_peak_bytes
from parallel.perf.calibrate import compare, fit_cpu_profile, summary
from parallel.perf.cluster import LLAMA3_8B, straggle
from parallel.perf.cost import Layout
from parallel.perf.hardware import PRESETS, resolve_hardware, save_hardware
from parallel.perf.predict import compare_strategies
from parallel.perf.published import distca_check, ring_flash_attention_check
from parallel.perf.workload import load_doclens, make_mask
from scripts.bench_cells import sample_doc_lens
from scripts.bench_report import load_records


def validate(args) -> None:
    docs = load_doclens(args.doclens)
    print("| case | published | simulated | error |\n|---|---|---|---|")
    for r in ring_flash_attention_check() + distca_check(docs):
        pub = r["published"]
        err = f"{(r['simulated'] - pub) / pub:+.1%}" if pub else "-"
        print(f"| {r['case']} | {pub if pub else '-'} | {r['simulated']:.3f} | {err} |")


def step_memory(args) -> int:
    """Peak bytes of one float32 training step on one rank: weights, gradients and Adam
    (unsharded) and the activations of seqlen / gpus tokens, by `predict_peak_bytes`."""
    options = MemoryOptions(args.activation_checkpoint, args.loss_chunk, args.mlp_chunk)
    if args.gpus < 1:
        raise ValueError(f"--gpus={args.gpus} must be at least 1")
    model = LlamaConfig(vocab_size=args.vocab_size, dim=args.hq * args.head_dim, n_layers=args.layers,
                        n_heads=args.hq, n_kv_heads=args.hkv, ffn_dim=args.ffn_dim,
                        tie_embeddings=args.tie_embeddings)
    peak = predict_peak_bytes(model, args.seqlen // args.gpus, options)
    print(f"Training step per rank ({args.seqlen // args.gpus:,} tokens, activation_checkpoint="
          f"{options.activation_checkpoint}, loss_chunk={options.loss_chunk}, mlp_chunk={options.mlp_chunk}): "
          f"peak {peak:,} bytes = {peak / 2**20:,.0f} MiB (float32, models.memory.predict_peak_bytes; the "
          "process's runtime not counted), plus the strategy's attention memory below.\n")
    return peak


def predict_cmd(args) -> None:
    step_memory(args)
    hw = resolve_hardware(args.hardware, "--hardware")
    lay = Layout(args.seqlen, args.hq, args.hkv, args.head_dim, 2)
    docs = sample_doc_lens(args.seqlen, {"file": args.doclens}, 0, setting="--doclens") \
        if "document" in args.mask else None
    mask = make_mask({"mask": args.mask, "seqlen": args.seqlen, "window": args.window, "doc_lens": docs})
    rows = compare_strategies(mask, lay, args.gpus, hw)
    print(f"| strategy | balancer | pairs max/mean | bytes/rank | memory/rank MiB | predicted ms | vs 1 GPU eff |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        shown = [f"{k}={v}" for k, v in r["options"].items() if k not in ("num_heads", "num_kv_heads")]
        name = r["strategy"] + (f" ({', '.join(shown)})" if shown else "")
        nbytes = f"{r['bytes']:,}" if r["bytes"] is not None else "-"
        mem = f"{r['memory'] / 2**20:,.0f}" if r["memory"] is not None else "-"
        print(f"| {name} | {r['balancer']} | {r['imbalance']:.3f} | {nbytes} | {mem} | {r['seconds'] * 1e3:.2f} | "
              f"{r['efficiency']:.3f} |")


def straggle_cmd(args) -> None:
    """DP / PP straggling from document-length imbalance, per way of placing attention."""
    docs = load_doclens(args.doclens)
    hw = resolve_hardware(args.hardware, "--hardware")
    print(f"Llama-3-8B shape, {args.gpus} x {hw.name}, tp={args.tp} cp={args.cp} pp={args.pp}, "
          f"{args.microbatches} microbatches of {args.tokens} tokens per replica, mean of {args.steps} sampled batches\n")
    print("| attention placement | DP replicas | step s | ideal s (equal microbatches) | lost to imbalance | "
          "DP straggle | PP straggle | PP bubble | tokens/s |\n|---|---|---|---|---|---|---|---|---|")
    for mode in ("per_doc_cp", "wlb", "cad"):
        r = straggle(docs, LLAMA3_8B, hw, gpus=args.gpus, tokens=args.tokens, tp=args.tp, cp=args.cp, pp=args.pp,
                     microbatches=args.microbatches, mode=mode, steps=args.steps, seed=args.seed)
        print(f"| {mode} | {r['dp']} | {r['step_s']:.3f} | {r['ideal_s']:.3f} | {r['loss']:.1%} | "
              f"{r['dp_straggle']:.3f} | {r['pp_straggle']:.3f} | {r['bubble']:.3f} | {r['tokens_per_s']:,.0f} |")


def calibrate(args) -> None:
    records = load_records(args.jsonl)
    held = load_records(args.validate) if args.validate else []
    masks = tuple(args.fit_masks or ())
    profile = fit_cpu_profile(records, concurrency_masks=masks)
    print(f"Profile fitted from {args.jsonl} (1-rank kernel cells, gloo probes"
          f"{', the P-rank cells of masks ' + '/'.join(masks) if masks else ''}):\n\n    {profile}\n")
    if args.save:
        save_hardware(profile, args.save)
        print(f"saved to {args.save} (parallel=auto takes it as its hardware option)\n")
    tables = [("the profile", compare(records, profile))]
    if held:
        tables.append((f"the profile, on the cells of {args.validate} (a separate run)", compare(held, profile)))
    for title, rows in tables:
        print(f"### Predicted from {title}\n")
        print("| cell | measured ms (median) | measured ms (fastest) | predicted ms | error vs median | "
              "error vs fastest |\n|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['id']} | {row['measured'] * 1e3:.0f} | {row['fastest'] * 1e3:.0f} | "
                  f"{row['predicted'] * 1e3:.0f} | {row['error']:+.1%} | {row['error_fastest']:+.1%} |")
        print(f"\nAll: {summary(rows)}.")
        if masks:
            print(f"Fitted masks ({'/'.join(masks)}): {summary([r for r in rows if r['mask'] in masks])}.  "
                  f"Held-out masks: {summary([r for r in rows if r['mask'] not in masks])}.")
        print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    doclens = dict(help="document-length JSON list (default: $LONGCTX_DOCLENS, else the packaged ProLong mix)")
    hardware = dict(default="h100", help=f"a preset ({', '.join(PRESETS)}) or a profile .json written by "
                                         "`calibrate --save` (default: h100)")
    v = sub.add_parser("validate", help="the model against published results (ring-flash-attention, DistCA)")
    v.add_argument("--doclens", **doclens)
    v.set_defaults(fn=validate)
    p = sub.add_parser("predict", help="time, bytes and memory per rank of every strategy on one shape")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--hardware", **hardware)
    p.add_argument("--mask", default="causal")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ffn-dim", type=int, default=14336)
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--tie-embeddings", action="store_true", help="one matrix for embedding and output")
    p.add_argument("--activation-checkpoint", default="none", help="train.activation_checkpoint: none, "
                   "selective or full")
    p.add_argument("--loss-chunk", type=int, default=0, help="train.loss_chunk (tokens; 0 = off)")
    p.add_argument("--mlp-chunk", type=int, default=0, help="train.mlp_chunk (tokens; 0 = off)")
    p.add_argument("--doclens", **doclens)
    p.set_defaults(fn=predict_cmd)
    s = sub.add_parser("straggle", help="DP/PP straggling from document-length imbalance (per_doc_cp, wlb, cad)")
    s.add_argument("--gpus", type=int, default=256)
    s.add_argument("--tokens", type=int, default=131072, help="tokens per microbatch (one packed sequence)")
    s.add_argument("--tp", type=int, default=8)
    s.add_argument("--cp", type=int, default=4)
    s.add_argument("--pp", type=int, default=4)
    s.add_argument("--microbatches", type=int, default=8)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--hardware", **hardware)
    s.add_argument("--doclens", **doclens)
    s.set_defaults(fn=straggle_cmd)
    c = sub.add_parser("calibrate", help="fit a CPU profile to a bench_cp run; predicted vs measured cells")
    c.add_argument("jsonl")
    c.add_argument("--save", help="write the fitted profile as JSON (for parallel=auto's hardware option)")
    c.add_argument("--fit-masks", nargs="*", help="masks whose P-rank cells fit the in-CP rate share (others held out)")
    c.add_argument("--validate", help="a second run's JSONL to predict with the profile fitted on the first")
    c.set_defaults(fn=calibrate)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:
        ap.exit(2, f"simulate_cp {args.cmd}: {e}\n")


if __name__ == "__main__":
    main()
