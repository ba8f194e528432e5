"""Baselines that need no training: historical average and last-value persistence."""

from __future__ import annotations

import numpy as np

from stgray.data.prepare import Prepared


def historical_average(p: Prepared, starts: np.ndarray, t_in: int, t_out: int) -> np.ndarray:
    """Hour-of-week mean of the train split for each output step: (B, t_out, N), data units.

    Slots never seen in training fall back to the node's train mean.
    """
    lo, hi = p.splits["train"]
    slot = p.dow * p.steps_per_day + p.tod  # (T,)
    n_slots = 7 * p.steps_per_day
    sums = np.zeros((n_slots, p.num_nodes))
    counts = np.zeros(n_slots)
    np.add.at(sums, slot[lo:hi], p.raw[lo:hi])
    np.add.at(counts, slot[lo:hi], 1)
    node_mean = p.raw[lo:hi].mean(0)
    table = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], node_mean[None])
    out_steps = starts[:, None] + t_in + np.arange(t_out)[None]
    return table[slot[out_steps]].astype(np.float32)


def persistence(p: Prepared, starts: np.ndarray, t_in: int, t_out: int) -> np.ndarray:
    """Last observed value repeated over the horizon: (B, t_out, N), data units."""
    last = p.raw[starts + t_in - 1]  # (B, N)
    return np.repeat(last[:, None, :], t_out, axis=1)
