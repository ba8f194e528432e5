"""Checks a City before any compute is spent on it; each failure is one DataError line."""

from __future__ import annotations

import numpy as np

from stgray.data.city import City
from stgray.errors import DataError

MAX_NODES = 50_000
MAX_CELLS = 2_000_000_000  # T*N*F float32 values: 8 GB


def validate_city(city: City, where: str | None = None) -> City:
    """Raise DataError naming ``where`` (the source file) and the field on the first problem."""
    where = where or city.name
    s = city.series
    if not isinstance(s, np.ndarray) or s.ndim != 3:
        raise DataError(f"expected rank 3 (time, nodes, features), got shape {getattr(s, 'shape', None)}",
                        where=where, field="series")
    t, n, f = s.shape
    if t < 2 or n < 1 or f < 1:
        raise DataError(f"empty dimension in shape {s.shape}", where=where, field="series")
    check_size(s.shape, where)
    if s.dtype != np.float32:
        raise DataError(f"dtype {s.dtype}, expected float32", where=where, field="series")
    bad = ~np.isfinite(s)
    if bad.any():
        if city.missing != "nan" or np.isinf(s).any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{int(bad.sum())} NaN/inf values (first at step,node,feature={idx})",
                            where=where, field="series")
    if not (len(city.features) == len(city.units) == len(city.aggregation) == f):
        raise DataError(f"{f} features but {len(city.features)} names, {len(city.units)} units, "
                        f"{len(city.aggregation)} aggregations", where=where, field="features")
    if any(a not in ("sum", "mean") for a in city.aggregation):
        raise DataError(f"aggregation must be 'sum' or 'mean', got {city.aggregation}",
                        where=where, field="aggregation")
    if len(city.node_ids) != n:
        raise DataError(f"{len(city.node_ids)} node ids for {n} nodes", where=where, field="node_ids")
    if len(set(city.node_ids)) != n:
        raise DataError("node ids are not unique", where=where, field="node_ids")
    if city.step_s <= 0:
        raise DataError(f"step must be positive, got {city.step_s} s", where=where, field="step")
    e, w = city.edges, city.weights
    if e.ndim != 2 or e.shape[1] != 2 or w.shape != (e.shape[0],):
        raise DataError(f"edges {e.shape} / weights {w.shape} do not match", where=where, field="graph")
    if len(e) and (e.min() < 0 or e.max() >= n):
        raise DataError(f"graph refers to node {int(e.max()) if e.max() >= n else int(e.min())} "
                        f"but the series has {n} nodes", where=where, field="graph")
    if not np.isfinite(w).all():
        raise DataError("NaN/inf edge weights", where=where, field="graph")
    if (w < 0).any():
        raise DataError(f"{int((w < 0).sum())} negative edge weights", where=where, field="graph")
    if city.coords is not None:
        c = city.coords
        if c.shape != (n, 2) or not np.isfinite(c).all():
            raise DataError(f"coordinates must be finite (nodes, 2), got {c.shape}",
                            where=where, field="coords")
    return city


def check_size(shape: tuple[int, ...], where: str) -> None:
    """Refuse series beyond the limits before anything else is read or allocated."""
    n = shape[1] if len(shape) > 1 else 1
    cells = int(np.prod(shape))
    if n > MAX_NODES or cells > MAX_CELLS:
        raise DataError(f"too large: {tuple(shape)} (limits: {MAX_NODES} nodes, {MAX_CELLS} values)",
                        where=where, field="series")


def validate_adjacency_shape(adj: np.ndarray, num_nodes: int, where: str) -> None:
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise DataError(f"adjacency must be square, got shape {adj.shape}", where=where, field="graph")
    if adj.shape[0] != num_nodes:
        raise DataError(f"graph has {adj.shape[0]} nodes but the series has {num_nodes}",
                        where=where, field="graph")
    if not np.isfinite(adj).all():
        raise DataError("NaN/inf in adjacency", where=where, field="graph")
    if (adj < 0).any():
        raise DataError(f"{int((adj < 0).sum())} negative adjacency weights", where=where, field="graph")


def validate_timestamps(ts, where: str) -> int:
    """Check timestamps are strictly increasing and regular; return the step in seconds."""
    import pandas as pd

    idx = pd.DatetimeIndex(ts).as_unit("ns")  # asi8 below is in the index unit (pandas 3: often us)
    if len(idx) < 2:
        raise DataError("fewer than 2 timestamps", where=where, field="timestamp")
    d = np.diff(idx.asi8)
    if (d <= 0).any():
        i = int(np.argmax(d <= 0))
        raise DataError(f"timestamps not increasing at row {i + 1} ({idx[i]} -> {idx[i + 1]})",
                        where=where, field="timestamp")
    step = int(np.median(d))
    irregular = d != step
    if irregular.any():
        i = int(np.argmax(irregular))
        raise DataError(f"irregular step at row {i + 1}: {idx[i]} -> {idx[i + 1]} "
                        f"(expected {pd.Timedelta(step)})", where=where, field="timestamp")
    return step // 1_000_000_000
