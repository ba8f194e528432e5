"""GPDiff: a zoo of per-node models, their parameters as tokens, and a diffusion model that
generates parameters for target nodes from per-node prompts.

Modules: ``params`` (named flat layout), ``tokenizer`` (layer-aware tokens, statistics,
Parquet shards), ``diffusion`` (schedulers, loss, training step, sampling), ``prompts``.
Submodules are imported explicitly (no heavy imports here).
"""
