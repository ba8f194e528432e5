"""Bring your own city: a CSV or Parquet table, one timestamp column and one column per node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.importers.common import numeric_array, read_table, require_file
from stgray.data.importers.user import assemble
from stgray.data.validate import validate_timestamps
from stgray.errors import DataError

SUFFIXES = (".csv", ".parquet", ".pq")
TIME_COLUMNS = ("timestamp", "time", "datetime", "date", "date_time")


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if len(found) != 1:
            raise DataError(f"expected one .csv/.parquet series file in the folder, found {len(found)}",
                            where=str(path))
        path = found[0]
    return {"series": require_file(path, "series file")}


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    sp = files["series"]
    where = str(sp)
    df = read_table(sp)
    if df.shape[1] < 2 or len(df) < 2:
        raise DataError(f"expected a timestamp column and node columns, got {df.shape[1]} columns, "
                        f"{len(df)} rows", where=where)
    col = options.get("time_column")
    lower = {str(c).strip().lower(): c for c in df.columns}
    if col is None:
        col = next((lower[c] for c in TIME_COLUMNS if c in lower), None)
        if col is None:
            raise DataError(f"no timestamp column (looked for {', '.join(TIME_COLUMNS)}; "
                            "or name it with time_column)", where=where, field="timestamp")
    elif col not in df.columns:
        raise DataError(f"no column '{col}'", where=where, field="time_column")
    try:
        ts = pd.to_datetime(df[col], utc=False)
    except (ValueError, TypeError) as e:
        raise DataError(f"cannot parse timestamps ({str(e).splitlines()[0][:100]})", where=where,
                        field=str(col)) from None
    if ts.isna().any():
        raise DataError(f"empty timestamp at row {int(np.argmax(ts.isna().to_numpy()))}", where=where, field=str(col))
    step_s = validate_timestamps(ts, where)
    idx = pd.DatetimeIndex(ts)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    nodes = [c for c in df.columns if c != col]
    node_ids = [str(c).strip() for c in nodes]
    if len(set(node_ids)) != len(node_ids):
        raise DataError("node columns are not unique", where=where, field="columns")
    values = np.empty((len(df), len(nodes)))
    for j, c in enumerate(nodes):
        values[:, j] = numeric_array(df[c].to_numpy(), where, str(c))
        bad = ~np.isfinite(values[:, j])
        if bad.any() and options.get("missing") != "nan":
            raise DataError(f"{int(bad.sum())} empty/NaN/inf values (first at row {int(np.argmax(bad))}); "
                            "fill them or pass missing=nan", where=where, field=str(c))
    notes = [f"series: {sp.name}, timestamp column '{col}', {len(nodes)} node columns; "
             f"step {step_s}s from the timestamps" + (" (timezone converted to UTC)" if pd.DatetimeIndex(ts).tz else "")]
    return assemble(name=name, series=values, node_ids=node_ids, start=idx[0], step_s=step_s, files=files,
                    options=options, fmt="table", notes=notes, where=sp)
