"""Per-node prompts for GPDiff, computable from a node's few days of data and the graph.

temporal (D_t = steps_per_day + 4): the node's mean daily profile and four statistics
    (mean, std, share of zeros, lag-1 autocorrelation), all on the city-normalised scale
    so that cities of different size are comparable;
spatial (D_s = walk_length + 3): random-walk positional encodings of the undirected
    graph (torch-geometric ``AddRandomWalkPE``; comparable across graphs, unlike
    Laplacian eigenvectors whose signs and order are arbitrary) plus log in-, out- and
    weighted degree.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch_geometric.data import Data
from torch_geometric.transforms import AddRandomWalkPE
from torch_geometric.utils import to_undirected

from stgray.data.prepare import Prepared


def temporal_prompts(p: Prepared, lo: int, hi: int) -> np.ndarray:
    """(N, steps_per_day + 4) float32 from normalised steps [lo, hi) of every node."""
    x = p.x[lo:hi]  # (t, N)
    spd = p.steps_per_day
    tod = p.tod[lo:hi]
    prof = np.zeros((spd, x.shape[1]), np.float64)
    cnt = np.zeros(spd)
    np.add.at(prof, tod, x)
    np.add.at(cnt, tod, 1)
    prof = prof / np.maximum(cnt, 1)[:, None]
    mean, std = x.mean(0), x.std(0)
    zeros = (p.raw[lo:hi] == 0).mean(0)
    xc = x - mean
    ac1 = (xc[1:] * xc[:-1]).sum(0) / np.maximum((xc ** 2).sum(0), 1e-8)
    return np.concatenate([prof.T, np.stack([mean, std, zeros, ac1], 1)], 1).astype(np.float32)


def spatial_prompts(adj, walk_length: int = 8) -> np.ndarray:
    """(N, walk_length + 3) float32 structural encodings of each node in the graph.

    ``adj``: (N, N) dense array or scipy sparse matrix/array; memory is O(edges)."""
    a = sp.coo_array(adj, dtype=np.float64)
    n = a.shape[0]
    off = (a.row != a.col) & (a.data != 0)
    src, dst, w = a.row[off].astype(np.int64), a.col[off].astype(np.int64), a.data[off]
    ei = to_undirected(torch.as_tensor(np.stack([src, dst]), dtype=torch.long), num_nodes=n)
    pe = AddRandomWalkPE(walk_length=walk_length, attr_name="pe")(Data(edge_index=ei, num_nodes=n)).pe
    deg_in = np.log1p(np.bincount(dst, minlength=n))
    deg_out = np.log1p(np.bincount(src, minlength=n))
    wmax = w.max() if len(w) and w.max() > 0 else 1.0
    wdeg = np.log1p(np.bincount(dst, w / wmax, minlength=n) + np.bincount(src, w / wmax, minlength=n))
    return np.concatenate([pe.numpy(), np.stack([deg_in, deg_out, wdeg], 1)], 1).astype(np.float32)


def node_prompts(p: Prepared, split: str = "train", walk_length: int = 8) -> np.ndarray:
    """(N, D) prompts: temporal from ``split`` of ``p`` followed by spatial."""
    lo, hi = p.splits[split]
    return np.concatenate([temporal_prompts(p, lo, hi), spatial_prompts(p.adj, walk_length)], 1)
