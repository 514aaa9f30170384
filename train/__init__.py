"""Training: the Hydra app, config schema, data, engines, loop, metrics and logging."""
