"""Baselines that need no training: historical average and last-value persistence."""

from __future__ import annotations

import numpy as np

from stgray.data.prepare import Prepared


def historical_average(p: Prepared, starts: np.ndarray, t_in: int, t_out: int) -> np.ndarray:
    """Hour-of-week mean of the train split for each output step: (B, t_out, N), data units.

    A week slot never seen in training (3 train days cover 3 weekdays) falls back to the
    same time of day's mean over all train days.
    """
    lo, hi = p.splits["train"]
    spd = p.steps_per_day
    slot = p.dow * spd + p.tod  # (T,)
    sums = np.zeros((7 * spd, p.num_nodes))
    counts = np.zeros(7 * spd)
    np.add.at(sums, slot[lo:hi], p.raw[lo:hi])
    np.add.at(counts, slot[lo:hi], 1)
    day_sums, day_counts = sums.reshape(7, spd, -1).sum(0), counts.reshape(7, spd).sum(0)
    node_mean = p.raw[lo:hi].mean(0)
    by_day = np.where(day_counts[:, None] > 0, day_sums / np.maximum(day_counts, 1)[:, None], node_mean[None])
    table = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.tile(by_day, (7, 1)))
    out_steps = starts[:, None] + t_in + np.arange(t_out)[None]
    return table[slot[out_steps]].astype(np.float32)


def persistence(p: Prepared, starts: np.ndarray, t_in: int, t_out: int) -> np.ndarray:
    """Last observed value repeated over the horizon: (B, t_out, N), data units."""
    last = p.raw[starts + t_in - 1]  # (B, N)
    return np.repeat(last[:, None, :], t_out, axis=1)


def _neighbours(p: Prepared) -> list[np.ndarray]:
    a = (abs(p.adj) + abs(p.adj.T)).tocsr()  # undirected pattern, O(edges)
    a.setdiag(0)
    a.eliminate_zeros()
    a.sort_indices()
    return [a.indices[a.indptr[i]:a.indptr[i + 1]].astype(np.int64) for i in range(p.num_nodes)]


def neighbour_weights(p: Prepared) -> np.ndarray:
    """(N_unobserved, N) averaging weights over each unobserved node's observed 1-hop
    neighbours (all observed nodes when it has none): the kriging baseline."""
    obs = np.zeros(p.num_nodes, bool)
    obs[p.observed] = True
    nb = _neighbours(p)
    w = np.zeros((len(p.unobserved), p.num_nodes), np.float32)
    for r, u in enumerate(p.unobserved):
        k = nb[u][obs[nb[u]]]
        k = k if len(k) else p.observed
        w[r, k] = 1.0 / len(k)
    return w


def kriging_neighbour_mean(p: Prepared, starts: np.ndarray, window: int) -> np.ndarray:
    """Unobserved nodes' values as the mean of their observed neighbours at the same step:
    (B, window, N_unobserved), data units."""
    idx = starts[:, None] + np.arange(window)[None]
    return p.raw[idx] @ neighbour_weights(p).T


def extrapolation_neighbour_ha(p: Prepared, starts: np.ndarray, t_in: int, t_out: int) -> np.ndarray:
    """Forecast at unobserved nodes: neighbour mean of the observed nodes' historical
    averages (the unobserved nodes have no history of their own): (B, t_out, N_unobserved)."""
    return historical_average(p, starts, t_in, t_out) @ neighbour_weights(p).T
