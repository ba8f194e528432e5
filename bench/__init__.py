"""Benchmarks: measurements, not tests. Each writes JSON under bench/results/."""
