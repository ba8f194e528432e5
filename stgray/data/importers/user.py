"""Shared assembly of user-supplied ("bring your own city") datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.importers.common import check_finite, finish, provenance
from stgray.data.importers.graphs import load_graph
from stgray.data.validate import check_size
from stgray.errors import DataError

# options every user format understands (stgray data import --help explains them)
USER_OPTIONS = ("graph", "coords", "k", "feature", "unit", "aggregation", "zeros", "step", "start", "key",
                "time_column", "missing")


def parse_step(step: Any, where: str | None = None) -> int:
    """Seconds from ``300``, ``"300"``, ``"5min"``, ``"1h"``, ``"10T"``..."""
    if step is None:
        raise DataError("the file has no timestamps: give the step (e.g. --step 5min)", where=where, field="step")
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
        s = int(step)
    else:
        text = str(step).strip()
        try:
            s = int(text) if text.isdigit() else int(pd.Timedelta(text).total_seconds())
        except (ValueError, TypeError):
            raise DataError(f"cannot read step '{text}' (use e.g. 300, 5min, 1h)", where=where, field="step") from None
    if s <= 0:
        raise DataError(f"step must be positive, got {step!r}", where=where, field="step")
    return s


def parse_start(start: Any, default: str, where: str | None = None) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(start if start is not None else default)
    except (ValueError, TypeError):
        raise DataError(f"cannot read start time '{start}'", where=where, field="start") from None
    if ts is pd.NaT:
        raise DataError(f"cannot read start time '{start}'", where=where, field="start")
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo is not None else ts


def _as_list(v: Any, f: int, default: str, what: str, where: str) -> list[str]:
    if v is None:
        return [f"{default}{i}" for i in range(f)] if what == "feature" and f > 1 else [default] * f
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else [str(s) for s in v]
    if len(items) == 1 and f > 1:
        items = items * f if what != "feature" else [f"{items[0]}{i}" for i in range(f)]
    if len(items) != f:
        raise DataError(f"{len(items)} {what}s given for {f} features", where=where, field=what)
    return items


def assemble(*, name: str, series: np.ndarray, node_ids: list[str], start: pd.Timestamp, step_s: int,
             files: dict[str, Path], options: dict[str, Any], fmt: str, notes: list[str],
             where: Path, default_feature: str = "value", default_unit: str = "unknown",
             default_aggregation: str = "mean", default_zeros: str = "values") -> City:
    """A City from a (T, N[, F]) series and the graph/coords options; validated."""
    w = str(where)
    if series.ndim == 2:
        series = series[:, :, None]
    if series.ndim != 3:
        raise DataError(f"expected rank 2 (time, nodes) or 3 (time, nodes, features), got shape {series.shape}",
                        where=w, field="series")
    if series.dtype.kind not in "fiub":
        raise DataError(f"dtype {series.dtype} is not numeric", where=w, field="series")
    check_size(series.shape, w)
    missing = options.get("missing") or "none"
    if missing not in ("none", "nan", "zero"):
        raise DataError(f"missing must be none, nan or zero, got '{missing}'", field="missing")
    if missing != "nan":
        check_finite(series, w, "series")
    elif np.isinf(series).any():
        raise DataError("inf values in series", where=w, field="series")
    t, n, f = series.shape
    if len(node_ids) != n:
        raise DataError(f"{len(node_ids)} node ids for {n} nodes", where=w, field="node_ids")
    features = _as_list(options.get("feature"), f, default_feature, "feature", w)
    units = _as_list(options.get("unit"), f, default_unit, "unit", w)
    aggregation = _as_list(options.get("aggregation"), f, default_aggregation, "aggregation", w)
    bad = [a for a in aggregation if a not in ("sum", "mean")]
    if bad:
        raise DataError(f"aggregation must be sum or mean, got '{bad[0]}'", field="aggregation")
    zeros = options.get("zeros") or default_zeros
    if zeros not in ("values", "missing"):
        raise DataError(f"zeros must be 'values' or 'missing', got '{zeros}'", field="zeros")
    if zeros == "missing" and missing == "none":
        missing = "zero"
    k = int(options.get("k") or 8)
    edges, weights, coords, ginfo = load_graph(node_ids, graph=options.get("graph"), coords=options.get("coords"),
                                               k=k, files=files)
    notes = list(notes)
    notes.append(f"graph: {ginfo.get('source', '?')}; {ginfo.get('edges', len(edges))} directed edges"
                 + (f"; {ginfo['self_loops']}" if ginfo.get("self_loops") else ""))
    if zeros == "missing":
        notes.append("zeros mark missing readings (zeros=missing)")
    prov = provenance(files, fmt=fmt, notes=notes, graph=ginfo,
                      options={k2: v for k2, v in options.items() if k2 not in ("graph", "coords")})
    city = City(name=name, series=np.ascontiguousarray(series, dtype=np.float32), start=start, step_s=int(step_s),
                features=features, units=units, aggregation=aggregation,  # type: ignore[arg-type]
                edges=edges, weights=weights, node_ids=[str(x) for x in node_ids], coords=coords,
                missing=missing, zeros_are_values=zeros == "values", provenance=prov)
    return finish(city, where)
