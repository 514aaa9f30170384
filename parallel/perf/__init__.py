"""The performance model of context-parallel attention, usable without a process group.

- `workload`: document lengths (one resolution rule; the ProLong mix ships as package data),
  the one packer of documents into sequences, a benchmark cell's mask.
- `hardware`: `Hardware` profiles, presets (GPUs and the measured `cpu`), JSON load/save and
  `resolve_hardware` (a preset name or a .json path), used by `parallel=auto` and
  `scripts.simulate_cp`.
- `cost`: exact pairs, bytes, kernel cuts and memory per rank of one attention call,
  dispatched to each strategy's own cost hooks through `parallel.STRATEGIES`.
- `predict`: seconds of one attention call per strategy; `compare_strategies`.
- `cluster`: whole training steps (DP / PP straggling from document-length imbalance).
- `calibrate`, `probes`: a CPU profile fitted to a benchmark run, from the probes a launch records.
- `published`: the model against published measurements.
"""
