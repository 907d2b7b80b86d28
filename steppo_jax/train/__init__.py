"""Training: config, SFT warm start, the StepPO loop, sharding, checkpoints and metrics.

Modules: ``config`` (typed, validated run configuration), ``checkpoint`` (orbax checkpoints
that resume exactly), ``metrics`` (metrics.jsonl, plots, the per-iteration line, summary.json).
"""
