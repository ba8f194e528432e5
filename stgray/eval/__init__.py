"""Metrics, baselines and the shared results table."""
