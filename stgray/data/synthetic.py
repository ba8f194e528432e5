"""Synthetic cities for scaling runs and tests: a graph and series of controllable size,
seasonality and spatial correlation, deterministic for a seed.

Graph: ``nodes`` points uniform in a square of side sqrt(nodes) (unit density, so the
neighbour distances do not depend on the size), each joined to its ``k`` nearest
neighbours in both directions (undirected), weight ``exp(-(d / sigma)^2)`` with ``sigma``
the median neighbour distance (a Gaussian kernel, as METR-LA-style graphs). Coordinates are
stored as (latitude, longitude) degrees, 1 unit = about 1 km near (45 N, 9 E).

Series (T = days x 86400 / step_s steps, one feature ``inflow``): for node i at step t

    rate[t, i] = level * scale[i] * max(0, 1 + daily_amplitude * d(t - phase[i])
                                          + weekly_amplitude * w(t)) * exp(noise * e[t, i])

d: a two-peak daily shape (morning and evening peaks) of unit amplitude; w: weekday +1,
weekend -1 (mean ~0.4); scale: log-normal per node (``scale_spread``); phase: a spatially
smooth shift of the daily peaks of up to about an hour; e: unit-variance noise that is
AR(1) in time (``temporal_corr``) and mixes white noise with the same noise diffused over
the graph (``spatial_hops`` random-walk steps) in proportion ``spatial_corr`` -- 0 gives
independent nodes, values towards 1 neighbours whose residuals move together. With
``counts`` the values are Poisson draws of ``rate`` (non-negative integers, zeros at
night when the level is low), else ``rate`` itself.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from stgray.config import StageConfig
from stgray.data.city import City
from stgray.data.validate import MAX_NODES, validate_city
from stgray.errors import ConfigError

PREFIX = "synth:"
SYNTH_FORMAT = "synthetic"


class SynthConfig(StageConfig):
    """How to draw a synthetic city (see the module doc for the model)."""

    nodes: int = Field(100, ge=2, le=MAX_NODES, description="number of nodes")
    days: float = Field(28.0, gt=0, le=3660, description="length in days")
    step_s: int = Field(3600, gt=0, description="time step in seconds")
    k: int = Field(8, gt=0, description="nearest neighbours per node (graph degree ~ k..2k)")
    daily_amplitude: float = Field(0.8, ge=0, description="daily seasonality, relative to the level")
    weekly_amplitude: float = Field(0.2, ge=0, description="weekday/weekend effect, relative to the level")
    spatial_corr: float = Field(0.6, ge=0, le=1, description="share of the noise variance shared "
                                                             "with graph neighbours (0 = independent)")
    spatial_hops: int = Field(3, ge=1, description="random-walk steps the shared noise spreads over")
    temporal_corr: float = Field(0.6, ge=0, lt=1, description="AR(1) coefficient of the noise in time")
    noise: float = Field(0.25, ge=0, description="std of the log-noise")
    level: float = Field(40.0, gt=0, description="median mean value per step")
    scale_spread: float = Field(0.6, ge=0, description="std of the log of the per-node scale")
    counts: bool = Field(True, description="Poisson counts (non-negative integers) instead of rates")
    start: str = Field("2024-01-01", description="first timestamp (a Monday by default)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.k >= self.nodes:
            raise ValueError(f"k={self.k} must be below nodes={self.nodes}")
        if 86400 % self.step_s:
            raise ValueError("step_s must divide a day")
        if self.steps < 2:
            raise ValueError("fewer than 2 steps")
        try:
            pd.Timestamp(self.start)
        except (ValueError, TypeError):
            raise ValueError(f"cannot read start '{self.start}'") from None
        if ":" in self.start:
            raise ValueError("start must be a date (YYYY-MM-DD): the name separates fields by ':'")
        return self

    @property
    def steps(self) -> int:
        return int(round(self.days * 86400 / self.step_s))

    @property
    def name(self) -> str:
        """Canonical city name: ``synth:`` + the non-default fields as ``key=value`` joined
        by ``:`` (sorted). ``parse_name(cfg.name) == cfg``."""
        default = SynthConfig.model_construct().model_dump()
        parts = []
        for key, v in sorted(self.model_dump().items()):
            if v != default[key]:
                parts.append(f"{key}={_fmt(v)}")
        return PREFIX + ":".join(parts) if parts else PREFIX + "default"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


_PART = re.compile(r"^([a-z_]+)=([^:=]+)$")


def is_synthetic(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_name(name: str) -> SynthConfig:
    """``synth:nodes=1000:seed=3`` (any SynthConfig fields; ``synth:default``) -> config.
    Only the canonical spelling (``SynthConfig.name``) is accepted."""
    if not is_synthetic(name):
        raise ConfigError(f"not a synthetic city name (want '{PREFIX}key=value:...')", where=name)
    body = name[len(PREFIX):]
    data: dict[str, Any] = {}
    if body != "default":
        for part in body.split(":"):
            m = _PART.match(part)
            if not m:
                raise ConfigError(f"cannot read '{part}' (want key=value, e.g. nodes=1000)", where=name)
            key, val = m.groups()
            if key in data:
                raise ConfigError(f"'{key}' given twice", where=name)
            data[key] = val
    cfg = SynthConfig.from_mapping(data, where=name)
    if cfg.name != name:  # one spelling per city: the name is its identity in every stage
        raise ConfigError(f"write this city as '{cfg.name}' (fields sorted, defaults left out)", where=name)
    return cfg


# --- generation ----------------------------------------------------------------------

def knn_graph(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Undirected k-NN graph of points ``xy`` (N, 2): (E, 2) int64 edges listing both
    directions, (E,) float32 Gaussian-kernel weights, and sigma (median kNN distance)."""
    from scipy.spatial import cKDTree

    n = len(xy)
    dist, idx = cKDTree(xy).query(xy, k=k + 1)
    src = np.repeat(np.arange(n), k)
    dst = idx[:, 1:].reshape(-1)
    d = dist[:, 1:].reshape(-1)
    sigma = float(np.median(d)) or 1.0
    # both directions, each pair once
    a, b = np.minimum(src, dst), np.maximum(src, dst)
    key = a.astype(np.int64) * n + b
    key, first = np.unique(key, return_index=True)
    a, b, d = key // n, key % n, d[first]
    edges = np.concatenate([np.stack([a, b], 1), np.stack([b, a], 1)]).astype(np.int64)
    w = np.exp(-(d / sigma) ** 2).astype(np.float32)
    return edges, np.concatenate([w, w]), sigma


def _walk_matrix(n: int, edges: np.ndarray, weights: np.ndarray):
    """Row-stochastic sparse (N, N) matrix of a lazy random walk: (A + I) row-normalised."""
    from scipy import sparse

    a = sparse.csr_matrix((weights.astype(np.float64), (edges[:, 0], edges[:, 1])), shape=(n, n))
    a = a + sparse.identity(n, format="csr")
    deg = np.asarray(a.sum(1)).ravel()
    return sparse.diags(1.0 / deg) @ a


def _unit_std(z: np.ndarray) -> np.ndarray:
    sd = z.std(0, keepdims=True)
    return z / np.where(sd > 1e-12, sd, 1.0)


def _daily_shape(hours: np.ndarray) -> np.ndarray:
    """Two rush-hour peaks (about 8 h and 18 h), low at night; values in about [-1, 1]."""
    h = np.mod(hours, 24.0)
    peaks = np.exp(-((h - 8.0) / 1.8) ** 2) + 0.9 * np.exp(-((h - 18.0) / 2.2) ** 2)
    day = 0.35 * np.exp(-((h - 13.0) / 4.0) ** 2)
    return 2.0 * (peaks + day) / 1.15 - 1.0


def generate(cfg: SynthConfig) -> City:
    """A validated synthetic ``City`` named ``cfg.name``: series (T, N, 1) float32."""
    rng = np.random.default_rng([cfg.seed, 0x5717])
    n, t = cfg.nodes, cfg.steps
    side = math.sqrt(n)
    xy = rng.uniform(0.0, side, size=(n, 2))
    edges, weights, sigma = knn_graph(xy, cfg.k)
    walk = _walk_matrix(n, edges, weights)

    def diffuse(z: np.ndarray, hops: int) -> np.ndarray:  # z (T, N): z_t <- W z_t per hop
        for _ in range(hops):
            z = (walk @ z.T).T
        return z

    # per-node scale and a spatially smooth phase of the daily peaks (hours)
    scale = np.exp(cfg.scale_spread * rng.standard_normal(n) - 0.5 * cfg.scale_spread ** 2)
    phase = _unit_std(diffuse(rng.standard_normal((1, n)), 8))[0] * 0.5

    ts = pd.date_range(pd.Timestamp(cfg.start), periods=t, freq=pd.Timedelta(seconds=cfg.step_s))
    hours = (ts.hour.to_numpy() + ts.minute.to_numpy() / 60.0 + ts.second.to_numpy() / 3600.0)
    weekly = np.where(ts.day_of_week.to_numpy() >= 5, -1.0, 1.0)
    season = 1.0 + cfg.daily_amplitude * _daily_shape(hours[:, None] - phase[None, :]) \
        + cfg.weekly_amplitude * weekly[:, None]
    season = np.maximum(season, 0.0)

    # noise: white + graph-diffused, unit variance per node, then AR(1) in time
    white = rng.standard_normal((t, n))
    shared = _unit_std(diffuse(rng.standard_normal((t, n)), cfg.spatial_hops))
    e = math.sqrt(1.0 - cfg.spatial_corr) * white + math.sqrt(cfg.spatial_corr) * shared
    if cfg.temporal_corr > 0:
        from scipy.signal import lfilter

        phi = cfg.temporal_corr
        e[0] /= math.sqrt(1.0 - phi ** 2)  # the first step has the stationary variance
        e = lfilter([math.sqrt(1.0 - phi ** 2)], [1.0, -phi], e, axis=0)
    rate = cfg.level * scale[None, :] * season * np.exp(cfg.noise * e - 0.5 * cfg.noise ** 2)
    values = rng.poisson(rate).astype(np.float32) if cfg.counts else rate.astype(np.float32)

    lat = 45.0 + xy[:, 1] / 111.0
    lon = 9.0 + xy[:, 0] / (111.0 * math.cos(math.radians(45.0)))
    city = City(
        name=cfg.name, series=values[:, :, None], start=pd.Timestamp(cfg.start), step_s=cfg.step_s,
        features=["inflow"], units=["count/step" if cfg.counts else "rate/step"], aggregation=["sum"],
        edges=edges, weights=weights, node_ids=[f"s{i}" for i in range(n)],
        coords=np.stack([lat, lon], 1), missing="none", zeros_are_values=True,
        provenance={"origin": {"kind": "synthetic", "generator": "stgray.data.synthetic",
                               "config": cfg.model_dump(mode="json")},
                    "licence": "generated (no licence needed)",
                    "notes": [f"k-NN graph, k={cfg.k}, Gaussian kernel sigma={sigma:.4g} (median "
                              "neighbour distance)", f"seed {cfg.seed}"]})
    return validate_city(city, where=cfg.name)


def neighbour_residual_corr(city: City, feature: int = 0) -> float:
    """Mean Pearson correlation over graph edges of the nodes' residuals after removing
    each node's hour-of-week mean (how much neighbours move together beyond seasonality)."""
    x = city.series[:, :, feature].astype(np.float64)
    ts = city.timestamps
    slot = ts.day_of_week.to_numpy() * 86400 // city.step_s + \
        (ts.hour.to_numpy() * 3600 + ts.minute.to_numpy() * 60) // city.step_s
    res = np.empty_like(x)
    for s in np.unique(slot):
        m = slot == s
        res[m] = x[m] - x[m].mean(0)
    res = _unit_std(res - res.mean(0))
    e = city.edges[city.edges[:, 0] < city.edges[:, 1]]
    return float(np.mean((res[:, e[:, 0]] * res[:, e[:, 1]]).mean(0)))


# --- the store -----------------------------------------------------------------------

def city_config(cfg: SynthConfig) -> dict[str, Any]:
    """The hashed config of a synthetic ``city`` artifact (no source files: the generator
    and its parameters define it)."""
    return {"dataset": cfg.name, "format": SYNTH_FORMAT, "options": cfg.model_dump(mode="json"),
            "sources": {}}


def import_synthetic(store, name_or_cfg: str | SynthConfig) -> tuple[str, City, bool]:
    """Generate a synthetic city into ``store`` (idempotent by its parameters); returns
    (artifact id, city, skipped) as ``stgray.data.ingest.import_city``."""
    from stgray.data.city import CITY_KIND, read_city, write_city

    cfg = parse_name(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    config = city_config(cfg)
    aid = store.id_for(CITY_KIND, config)
    if store.exists(aid):
        return aid, read_city(store, aid), True
    city = generate(cfg)
    with store.writer(CITY_KIND, config, label=city.name, meta=city.summary()) as w:
        write_city(w, city)
    return aid, city, False
