"""METR-LA / PEMS-BAY-style series: a pandas HDF5 frame (DatetimeIndex x sensor columns).

Read with h5py, not ``pandas.read_hdf``: pandas/PyTables store some attributes of every
frame as pickles (e.g. the index ``freq``) and unpickle them on read, so opening an
untrusted ``.h5`` with pandas can run code. Here only numeric datasets and plain string
attributes are read; the one pickled attribute needed for the "table" layout (column
names) goes through the restricted unpickler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.importers.safe_pickle import safe_loads
from stgray.data.importers.user import assemble
from stgray.data.validate import validate_timestamps
from stgray.errors import DataError

SUFFIXES = (".h5", ".hdf5", ".hdf")


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    from stgray.data.importers.common import require_file

    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if len(found) != 1:
            raise DataError(f"expected one .h5 file in the folder, found {len(found)}", where=str(path))
        path = found[0]
    return {"series": require_file(path, "series file")}


def _attr_str(obj, name: str, default: str | None = None) -> str | None:
    v = obj.attrs.get(name, default)
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, str):
        return v
    return default


def _labels(ds, where: str, field: str) -> list[str]:
    if _attr_str(ds, "PSEUDOATOM") == "object" or ds.dtype.kind == "O":
        raise DataError("labels are pickled Python objects; refused (write string or integer labels)",
                        where=where, field=field)
    vals = ds[()]
    if vals.dtype.kind == "S":
        return [v.decode("utf-8") for v in vals]
    if vals.dtype.kind in "iu":
        return [str(int(v)) for v in vals]
    if vals.dtype.kind == "U":
        return [str(v) for v in vals]
    raise DataError(f"labels of dtype {vals.dtype} not supported", where=where, field=field)


def _datetime_index(values: np.ndarray, kind: str | None, where: str, field: str) -> pd.DatetimeIndex:
    kind = kind or ""
    if not kind.startswith("datetime64"):
        raise DataError(f"index is not a DatetimeIndex (kind '{kind or '?'}')", where=where, field=field)
    unit = kind[len("datetime64["):-1] if "[" in kind else "ns"
    if unit not in ("s", "ms", "us", "ns"):
        raise DataError(f"unsupported datetime unit '{unit}'", where=where, field=field)
    return pd.DatetimeIndex(np.asarray(values, dtype=np.int64).astype(f"datetime64[{unit}]"))


def read_frame(path: Path, key: str | None = None) -> tuple[pd.DatetimeIndex, list[str], np.ndarray, str]:
    """(timestamps, column labels, (T, N) float64 values, key) of a pandas HDF5 frame."""
    import h5py

    where = str(path)
    try:
        h = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"not a readable HDF5 file ({str(e).splitlines()[0][:100]})", where=where) from None
    with h:
        frames = [k for k, g in h.items() if isinstance(g, h5py.Group) and _attr_str(g, "pandas_type")]
        if key is None:
            if len(frames) == 1:
                key = frames[0]
            elif "df" in frames:
                key = "df"
            else:
                raise DataError(f"{len(frames)} pandas frames {frames}; say which (key)", where=where, field="key")
        key = key.strip("/")
        if key not in h or not isinstance(h[key], h5py.Group):
            raise DataError(f"no frame '{key}' (has {frames})", where=where, field=key)
        g = h[key]
        ptype = _attr_str(g, "pandas_type")
        try:
            if ptype == "frame":
                return (*_read_fixed(g, where, key), key)
            if ptype == "frame_table":
                return (*_read_table(g, where, key), key)
        except KeyError as e:
            raise DataError(f"malformed pandas frame (missing {e})", where=where, field=key) from None
        raise DataError(f"'{key}' is a pandas '{ptype}', expected a DataFrame", where=where, field=key)


def _read_fixed(g, where: str, key: str) -> tuple[pd.DatetimeIndex, list[str], np.ndarray]:
    columns = _labels(g["axis0"], where, f"{key}/axis0")
    index = _datetime_index(g["axis1"][()], _attr_str(g["axis1"], "kind"), where, f"{key}/index")
    t, n = len(index), len(columns)
    out = np.full((t, n), np.nan)
    pos = {c: i for i, c in enumerate(columns)}
    covered = 0
    for b in range(int(g.attrs.get("nblocks", 1))):
        items = _labels(g[f"block{b}_items"], where, f"{key}/block{b}_items")
        ds = g[f"block{b}_values"]
        if _attr_str(ds, "PSEUDOATOM") == "object" or ds.dtype.kind not in "fiub":
            raise DataError(f"columns {items[:3]} are not numeric (pickled objects are refused)",
                            where=where, field=f"{key}/block{b}_values")
        vals = ds[()]
        if vals.shape == (len(items), t) and vals.shape != (t, len(items)):
            vals = vals.T
        if vals.shape != (t, len(items)):
            raise DataError(f"block of shape {vals.shape} for {t} rows x {len(items)} columns",
                            where=where, field=f"{key}/block{b}_values")
        for j, c in enumerate(items):
            out[:, pos[c]] = vals[:, j]
        covered += len(items)
    if covered != n:
        raise DataError(f"blocks hold {covered} columns, the frame has {n}", where=where, field=key)
    return index, columns, out


def _read_table(g, where: str, key: str) -> tuple[pd.DatetimeIndex, list[str], np.ndarray]:
    tbl = g["table"]
    data = tbl[()]
    index = _datetime_index(data["index"], _attr_str(tbl, "index_kind"), where, f"{key}/index")
    cols: list[str] = []
    blocks = []
    for name in data.dtype.names:
        if not name.startswith("values_block_"):
            continue
        raw = tbl.attrs.get(f"{name}_kind")
        labels = safe_loads(bytes(raw), where=f"{where}:{key}/{name}_kind") if raw is not None else None
        if not isinstance(labels, list):
            raise DataError("column names missing", where=where, field=f"{key}/{name}_kind")
        vals = np.asarray(data[name])
        if vals.dtype.kind not in "fiub":
            raise DataError(f"columns {labels[:3]} are not numeric", where=where, field=f"{key}/{name}")
        vals = vals.reshape(len(index), -1)
        cols += [str(c) for c in labels]
        blocks.append(vals.astype(np.float64))
    if not blocks:
        raise DataError("no value columns", where=where, field=key)
    return index, cols, np.concatenate(blocks, 1)


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    sp = files["series"]
    index, columns, values, key = read_frame(sp, options.get("key"))
    if len(set(columns)) != len(columns):
        raise DataError("column (sensor) ids are not unique", where=str(sp), field=f"{key}/axis0")
    step_s = validate_timestamps(index, str(sp))
    if index.tz is not None:
        index = index.tz_convert("UTC").tz_localize(None)
    notes = [f"series: pandas HDF5 frame '{key}' {values.shape} (time x sensors) read with h5py "
             "(no unpickling); step and start from its DatetimeIndex"]
    return assemble(name=name, series=values, node_ids=columns, start=index[0], step_s=step_s, files=files,
                    options=options, fmt="hdf5", notes=notes, where=sp, default_feature="speed",
                    default_unit="mph", default_aggregation="mean", default_zeros="missing")
