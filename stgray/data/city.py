"""The canonical city dataset and its storage as Parquet + JSON in the artifact store."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stgray.errors import DataError

Missing = Literal["none", "nan", "zero"]
Aggregation = Literal["sum", "mean"]
CITY_KIND = "city"


@dataclass
class City:
    """One city's sensor series and graph.

    series: (T, N, F) float32, T regular steps of ``step_s`` seconds from ``start``.
    edges: (E, 2) int64 (source, target) node indices; ``weights``: (E,) float32 >= 0.
    The graph is directed; an undirected one lists both directions.
    coords: optional (N, 2) float64 (latitude, longitude in degrees).
    missing: how gaps are marked in ``series``: "none", "nan" or "zero" (zeros may be
    real values too, e.g. night-time flows; see ``zeros_are_values``).
    aggregation: per feature, how to resample: "sum" for counts, "mean" for rates/speeds.
    provenance: where the data came from (files and checksums, origin, notes).
    """

    name: str
    series: np.ndarray
    start: pd.Timestamp
    step_s: int
    features: list[str]
    units: list[str]
    aggregation: list[Aggregation]
    edges: np.ndarray
    weights: np.ndarray
    node_ids: list[str]
    coords: np.ndarray | None = None
    missing: Missing = "none"
    zeros_are_values: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.series.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.series.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.series.shape[2])

    @property
    def timestamps(self) -> pd.DatetimeIndex:
        return pd.date_range(self.start, periods=self.num_steps, freq=pd.Timedelta(seconds=self.step_s))

    @property
    def days(self) -> float:
        return self.num_steps * self.step_s / 86400.0

    def adjacency(self, dtype=np.float32) -> np.ndarray:
        """Dense (N, N) weighted adjacency, ``A[i, j]`` = weight of edge i -> j."""
        a = np.zeros((self.num_nodes, self.num_nodes), dtype=dtype)
        if len(self.edges):
            a[self.edges[:, 0], self.edges[:, 1]] = self.weights
        return a

    def summary(self) -> dict[str, Any]:
        s = self.series
        finite = s[np.isfinite(s)]
        return {
            "name": self.name,
            "steps": self.num_steps,
            "nodes": self.num_nodes,
            "features": ",".join(self.features),
            "step": _fmt_step(self.step_s),
            "start": str(self.start),
            "days": round(self.days, 1),
            "edges": int(len(self.edges)),
            "min": float(finite.min()) if finite.size else math.nan,
            "max": float(finite.max()) if finite.size else math.nan,
            "zeros%": round(100.0 * float((s == 0).mean()), 1),
        }

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start": self.start.isoformat(),
            "step_s": int(self.step_s),
            "shape": list(self.series.shape),
            "features": list(self.features),
            "units": list(self.units),
            "aggregation": list(self.aggregation),
            "node_ids": list(self.node_ids),
            "has_coords": self.coords is not None,
            "missing": self.missing,
            "zeros_are_values": self.zeros_are_values,
            "provenance": self.provenance,
        }


def _fmt_step(s: int) -> str:
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}min"
    return f"{s}s"


def edges_from_dense(adj: np.ndarray, *, drop_self_loops: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(E, 2) int64 edges and (E,) float32 weights of the non-zero entries of ``adj``."""
    a = np.asarray(adj, dtype=np.float64)
    if drop_self_loops:
        a = a.copy()
        np.fill_diagonal(a, 0.0)
    src, dst = np.nonzero(a)
    return np.stack([src, dst], 1).astype(np.int64), a[src, dst].astype(np.float32)


# --- storage -------------------------------------------------------------------------

def _series_table(city: City) -> pa.Table:
    t, n, f = city.series.shape
    flat = np.ascontiguousarray(city.series.reshape(t, n * f), dtype=np.float32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), n * f)
    ts = pa.array(city.timestamps.as_unit("s").to_numpy(), type=pa.timestamp("s"))
    return pa.table({"timestamp": ts, "values": values})


def _to_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_city(writer, city: City) -> None:
    """Put a city's objects into an open ``ArtifactWriter``."""
    writer.put_bytes("series.parquet", _to_parquet(_series_table(city)))
    writer.put_bytes("graph.parquet", _to_parquet(pa.table({
        "source": pa.array(city.edges[:, 0] if len(city.edges) else [], type=pa.int64()),
        "target": pa.array(city.edges[:, 1] if len(city.edges) else [], type=pa.int64()),
        "weight": pa.array(city.weights, type=pa.float32()),
    })))
    nodes = {"node_id": pa.array(city.node_ids, type=pa.string())}
    if city.coords is not None:
        nodes["lat"] = pa.array(city.coords[:, 0], type=pa.float64())
        nodes["lon"] = pa.array(city.coords[:, 1], type=pa.float64())
    writer.put_bytes("nodes.parquet", _to_parquet(pa.table(nodes)))
    writer.put_json("meta.json", city.meta())


def read_city(store, artifact_id: str) -> City:
    """Load and verify a city artifact (every object is checksummed on read)."""
    m = store.manifest(artifact_id)
    if m.kind != CITY_KIND:
        raise DataError(f"artifact is a '{m.kind}', not a city", where=artifact_id)
    meta = store.read_json(artifact_id, "meta.json", m)
    series_t = pq.read_table(io.BytesIO(store.read_bytes(artifact_id, "series.parquet", m)))
    graph_t = pq.read_table(io.BytesIO(store.read_bytes(artifact_id, "graph.parquet", m)))
    nodes_t = pq.read_table(io.BytesIO(store.read_bytes(artifact_id, "nodes.parquet", m)))
    t, n, f = meta["shape"]
    vals = series_t.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    series = vals.astype(np.float32, copy=False).reshape(t, n, f)
    edges = np.stack([graph_t.column("source").to_numpy(), graph_t.column("target").to_numpy()], 1)
    coords = None
    if meta.get("has_coords"):
        coords = np.stack([nodes_t.column("lat").to_numpy(), nodes_t.column("lon").to_numpy()], 1)
    return City(
        name=meta["name"], series=series, start=pd.Timestamp(meta["start"]), step_s=meta["step_s"],
        features=meta["features"], units=meta["units"], aggregation=meta["aggregation"],
        edges=edges.astype(np.int64).reshape(-1, 2), weights=graph_t.column("weight").to_numpy().astype(np.float32),
        node_ids=[str(x) for x in nodes_t.column("node_id").to_pylist()], coords=coords,
        missing=meta["missing"], zeros_are_values=meta["zeros_are_values"],
        provenance=meta.get("provenance", {}),
    )
