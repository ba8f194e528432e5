"""From a stored City to model-ready data: resample, split, normalise, time features, windows.

The protocol (../shared/docs/benchmark.md):
- a *source* city: its whole series split 80/20 in time into train/val;
- a *target* city: days 1-3 train, days 4-6 validation, the rest test (capped);
- normalisation statistics from the train split only, stored with the prepared artifact;
- kriging: a seeded 30% of nodes are unobserved.
A window belongs to the split that holds all of its *output* steps; its inputs may reach
back into the previous split (that history is known at forecast time).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field, model_validator

from stgray.config import StageConfig
from stgray.data.city import City, read_city
from stgray.errors import DataError

Role = Literal["source", "target"]
PREPARED_KIND = "prepared"


class PrepareConfig(StageConfig):
    """How a city becomes model-ready data (one config for sources and targets)."""

    step_s: int = Field(3600, gt=0, description="common step in seconds (resampled to)")
    feature: str | int = Field(0, description="feature name or index to model")
    source_train_frac: float = Field(0.8, gt=0, lt=1)
    target_train_days: float = Field(3.0, gt=0)
    target_val_days: float = Field(3.0, gt=0)
    target_test_days: float | None = Field(14.0, gt=0, description="cap on the test period")
    unobserved_frac: float = Field(0.3, ge=0, lt=1, description="kriging: share of unobserved nodes")
    split_seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "PrepareConfig":
        if self.step_s % 60:
            raise ValueError("step_s must be a whole number of minutes")
        return self


@dataclass
class Prepared:
    """One city ready for models.

    raw: (T, N) float32 values in the city's units after resampling.
    x: (T, N) float32 normalised ``(raw - mean) / std`` with train-split statistics.
    tod: (T,) int64 step of day (0 .. steps_per_day-1); dow: (T,) int64 day of week (Mon=0).
    adj: (N, N) float32 weighted adjacency as a sparse CSR array, ``adj[i, j]`` = weight of
        edge i -> j (a dense array given here is converted; ``dense_adj()`` for the dense one).
    splits: name -> [start, end) step range; unobserved: sorted node indices (kriging).
    offset: (T, N) float32 normalised seasonal part already taken out of ``x`` (``x +
        offset`` is the normalised series; see ``deseasonalise``), None when none was;
        shared_offset: (T,) the observed nodes' mean of it (what a node without data gets).
    """

    name: str
    role: Role
    raw: np.ndarray
    x: np.ndarray
    mean: float
    std: float
    tod: np.ndarray
    dow: np.ndarray
    adj: sp.csr_array
    splits: dict[str, tuple[int, int]]
    unobserved: np.ndarray
    step_s: int
    start: pd.Timestamp
    zeros_are_values: bool = True
    offset: np.ndarray | None = None
    shared_offset: np.ndarray | None = None

    def __post_init__(self):
        self.adj = as_sparse_adjacency(self.adj, self.num_nodes)

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[1])

    def dense_adj(self) -> np.ndarray:
        """(N, N) float32 dense adjacency (N^2 memory: for models that attend over all pairs)."""
        return self.adj.toarray()

    @property
    def steps_per_day(self) -> int:
        return 86400 // self.step_s

    @property
    def observed(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.num_nodes), self.unobserved)

    def denormalise(self, z):
        return z * self.std + self.mean

    def window_starts(self, split: str, t_in: int, t_out: int, stride: int = 1) -> np.ndarray:
        """Start steps s of windows [s, s+t_in+t_out) whose outputs lie inside ``split``."""
        lo, hi = self.splits[split]
        first = max(0, lo - t_in)
        last = hi - t_in - t_out  # inclusive
        if last < first:
            return np.zeros(0, dtype=np.int64)
        return np.arange(first, last + 1, stride, dtype=np.int64)

    def windows(self, starts: np.ndarray, t_in: int, t_out: int, normalised: bool = True):
        """Inputs (B, t_in, N) and outputs (B, t_out, N) for window ``starts`` (views copied)."""
        src = self.x if normalised else self.raw
        idx = starts[:, None] + np.arange(t_in + t_out)[None, :]
        w = src[idx]
        return w[:, :t_in], w[:, t_in:]

    def stats(self) -> dict:
        return {"mean": self.mean, "std": self.std, "splits": {k: list(v) for k, v in self.splits.items()},
                "unobserved": self.unobserved.tolist(), "step_s": self.step_s,
                "start": self.start.isoformat(), "role": self.role, "name": self.name,
                "zeros_are_values": self.zeros_are_values}


def as_sparse_adjacency(adj, num_nodes: int) -> sp.csr_array:
    """(N, N) float32 CSR array without explicit zeros, from a dense or sparse adjacency."""
    a = sp.csr_array(adj, dtype=np.float32)
    if a.shape != (num_nodes, num_nodes):
        raise ValueError(f"adjacency shape {a.shape} does not match {num_nodes} nodes")
    a.sum_duplicates()
    a.eliminate_zeros()
    a.sort_indices()
    return a


def adjacency_from_edges(edges: np.ndarray, weights: np.ndarray, num_nodes: int) -> sp.csr_array:
    """Sparse adjacency of an edge list; a repeated edge keeps its last weight (as a dense
    assignment ``A[i, j] = w`` would)."""
    e = np.asarray(edges, np.int64).reshape(-1, 2)
    w = np.asarray(weights, np.float32).reshape(-1)
    if len(e):
        key = e[:, 0] * num_nodes + e[:, 1]
        _, last = np.unique(key[::-1], return_index=True)
        keep = len(key) - 1 - last
        e, w = e[keep], w[keep]
    a = sp.coo_array((w, (e[:, 0], e[:, 1])), shape=(num_nodes, num_nodes))
    return as_sparse_adjacency(a, num_nodes)


def resample(city: City, step_s: int) -> City:
    """Aggregate to ``step_s`` (sum for counts, mean for speeds); trailing partial step dropped."""
    if step_s == city.step_s:
        return city
    if step_s % city.step_s:
        raise DataError(f"cannot resample a {city.step_s}s step to {step_s}s (not a multiple)",
                        where=city.name, field="step")
    k = step_s // city.step_s
    t = (city.num_steps // k) * k
    if t == 0:
        raise DataError(f"series shorter than one {step_s}s step", where=city.name, field="series")
    blocks = city.series[:t].reshape(t // k, k, city.num_nodes, city.num_features)
    out = np.empty(blocks.shape[:1] + blocks.shape[2:], dtype=np.float32)
    for j, agg in enumerate(city.aggregation):
        out[..., j] = blocks[..., j].sum(1) if agg == "sum" else blocks[..., j].mean(1)
    prov = dict(city.provenance)
    prov["resampled"] = f"{city.step_s}s -> {step_s}s ({', '.join(city.aggregation)}; " \
                        f"{city.num_steps - t} trailing steps dropped)"
    return City(**{**city.__dict__, "series": out, "step_s": step_s, "provenance": prov})


def _feature_index(city: City, feature: str | int) -> int:
    if isinstance(feature, int):
        if not 0 <= feature < city.num_features:
            raise DataError(f"feature index {feature} out of range ({city.num_features} features)",
                            where=city.name, field="feature")
        return feature
    if feature not in city.features:
        raise DataError(f"no feature '{feature}' (has {city.features})", where=city.name, field="feature")
    return city.features.index(feature)


def prepare(city: City, cfg: PrepareConfig, role: Role) -> Prepared:
    """Resample, select the feature, split, normalise on train, add time features."""
    c = resample(city, cfg.step_s)
    j = _feature_index(c, cfg.feature)
    raw = np.ascontiguousarray(c.series[:, :, j], dtype=np.float32)
    if np.isnan(raw).any():  # gaps marked NaN: fill by last value, then 0 (documented)
        raw = pd.DataFrame(raw).ffill().fillna(0.0).to_numpy(np.float32)
    t = raw.shape[0]
    per_day = 86400 // cfg.step_s
    if role == "source":
        cut = int(round(t * cfg.source_train_frac))
        splits = {"train": (0, cut), "val": (cut, t)}
    else:
        tr = int(round(cfg.target_train_days * per_day))
        va = tr + int(round(cfg.target_val_days * per_day))
        need = va + per_day  # at least one test day
        if t < need:
            raise DataError(f"target has {t * cfg.step_s / 86400:.1f} days; the protocol needs at least "
                            f"{need * cfg.step_s / 86400:.1f} (train {cfg.target_train_days}, "
                            f"val {cfg.target_val_days}, 1 test day)", where=city.name, field="series")
        end = t if cfg.target_test_days is None else min(t, va + int(round(cfg.target_test_days * per_day)))
        splits = {"train": (0, tr), "val": (tr, va), "test": (va, end)}
    lo, hi = splits["train"]
    mean = float(raw[lo:hi].mean())
    std = float(raw[lo:hi].std())
    std = std if std > 1e-6 else 1.0
    x = ((raw - mean) / std).astype(np.float32)
    ts = pd.date_range(c.start, periods=t, freq=pd.Timedelta(seconds=cfg.step_s))
    secs = ts.hour.to_numpy() * 3600 + ts.minute.to_numpy() * 60 + ts.second.to_numpy()
    tod = (secs // cfg.step_s).astype(np.int64)
    dow = ts.day_of_week.to_numpy().astype(np.int64)
    n = c.num_nodes
    rng = np.random.default_rng(cfg.split_seed)
    n_un = int(round(cfg.unobserved_frac * n))
    unobserved = np.sort(rng.choice(n, size=n_un, replace=False)) if n_un else np.zeros(0, np.int64)
    return Prepared(name=c.name, role=role, raw=raw, x=x, mean=mean, std=std, tod=tod, dow=dow,
                    adj=adjacency_from_edges(c.edges, c.weights, n), splits=splits,
                    unobserved=unobserved.astype(np.int64),
                    step_s=cfg.step_s, start=pd.Timestamp(c.start), zeros_are_values=c.zeros_are_values)


def seasonal_baseline(p, kind: str = "tod_mean") -> np.ndarray:
    """(T, N) float32 normalised time-of-day mean of ``p.x`` over the train split.

    Cross-fitted on the train split itself: a train step gets the mean of the *other*
    train days at its time of day (a model fitted on train residuals must not see its
    own target in the baseline; with 3 train days the in-sample mean would hold a third
    of it). Other steps get the mean of all train days; a time of day never seen in
    training gets the node's train mean.
    """
    if kind != "tod_mean":
        raise ValueError(f"unknown baseline '{kind}'")
    lo, hi = p.splits["train"]
    spd = p.steps_per_day
    x = np.asarray(p.x, dtype=np.float64)
    sums = np.zeros((spd, x.shape[1]))
    counts = np.zeros(spd)
    np.add.at(sums, p.tod[lo:hi], x[lo:hi])
    np.add.at(counts, p.tod[lo:hi], 1)
    node_mean = x[lo:hi].mean(0)
    c = counts[p.tod][:, None]  # (T, 1)
    base = np.where(c > 0, sums[p.tod] / np.maximum(c, 1), node_mean[None])
    tr = slice(lo, hi)
    c_tr = c[tr]
    loo = (sums[p.tod[tr]] - x[tr]) / np.maximum(c_tr - 1, 1)
    base[tr] = np.where(c_tr > 1, loo, base[tr])
    return base.astype(np.float32)


def deseasonalise(p: Prepared) -> Prepared:
    """A copy of ``p`` whose ``x`` is the residual after ``seasonal_baseline`` (each node's
    time-of-day mean over the train split, normalised units), kept in ``offset`` to be
    added back. The unobserved (kriging) nodes' values are never read: they get
    ``shared_offset``, the mean of the observed nodes' baselines."""
    if p.offset is not None:
        return p
    offset = seasonal_baseline(p)
    obs = p.observed
    shared = offset[:, obs].mean(1) if len(obs) else np.zeros(len(offset), np.float32)
    offset[:, p.unobserved] = shared[:, None]
    return replace(p, x=(p.x - offset).astype(np.float32), offset=offset, shared_offset=shared)


# --- store ---------------------------------------------------------------------------

def prepare_to_store(store, city_id: str, cfg: PrepareConfig, role: Role) -> tuple[str, bool]:
    """Idempotent stage: city artifact -> ``prepared`` artifact. Returns (id, skipped)."""
    config = {"prepare": cfg.hashed_dict(), "role": role}
    aid = store.id_for(PREPARED_KIND, config, [city_id])
    if store.exists(aid):
        return aid, True
    p = prepare(read_city(store, city_id), cfg, role)
    with store.writer(PREPARED_KIND, config, [city_id], label=f"{p.name}:{role}",
                      meta={"mean": p.mean, "std": p.std, "splits": p.stats()["splits"]}) as w:
        buf = io.BytesIO()
        a = p.adj.tocoo()
        np.savez(buf, raw=p.raw, adj_src=a.row.astype(np.int64), adj_dst=a.col.astype(np.int64),
                 adj_w=a.data.astype(np.float32), tod=p.tod, dow=p.dow, unobserved=p.unobserved)
        w.put_bytes("arrays.npz", buf.getvalue())
        w.put_json("stats.json", p.stats())
    return aid, False


def load_prepared(store, artifact_id: str) -> Prepared:
    """Read a ``prepared`` artifact (checksummed; arrays loaded without pickle)."""
    m = store.manifest(artifact_id)
    st = store.read_json(artifact_id, "stats.json", m)
    with np.load(io.BytesIO(store.read_bytes(artifact_id, "arrays.npz", m)), allow_pickle=False) as z:
        raw, tod, dow, un = (z[k] for k in ("raw", "tod", "dow", "unobserved"))
        n = raw.shape[1]
        if "adj" in z.files:  # written before the adjacency was stored as edges
            adj = as_sparse_adjacency(z["adj"], n)
        else:
            adj = sp.coo_array((z["adj_w"], (z["adj_src"], z["adj_dst"])), shape=(n, n))
    x = ((raw - st["mean"]) / st["std"]).astype(np.float32)
    return Prepared(name=st["name"], role=st["role"], raw=raw, x=x, mean=st["mean"], std=st["std"],
                    tod=tod, dow=dow, adj=adj, splits={k: tuple(v) for k, v in st["splits"].items()},
                    unobserved=un, step_s=st["step_s"], start=pd.Timestamp(st["start"]),
                    zeros_are_values=st["zeros_are_values"])
