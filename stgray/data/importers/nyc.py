"""NYC Citi Bike / yellow-taxi in/out flow over 69 Manhattan taxi zones (Deep-NYC-Taxi-Bike)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.importers.common import (check_finite, check_rank, finish, graph_from_dense, load_npz,
                                          provenance, read_csv, require_file)
from stgray.data.importers.graphs import read_adjacency_csv
from stgray.errors import DataError

START = "2019-01-01 00:00"
STEP_S = 3600


def series_name(mode: str) -> str:
    return f"201901-202012-NYC{mode}-inoutflow.npz"


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    """A folder with the npz, W_adj_matrix.csv and manhattan_zones.csv (or the npz itself)."""
    folder = path if path.is_dir() else path.parent
    mode = options.get("mode")
    if path.is_file():
        series = path
    else:
        if mode is None:
            found = [m for m in ("bike", "taxi") if (folder / series_name(m)).is_file()]
            if len(found) != 1:
                raise DataError("say which series to import (options mode=bike or mode=taxi)",
                                where=str(folder), field="mode")
            mode = found[0]
        series = folder / series_name(mode)
    return {"series": require_file(series, "series file"),
            "graph": require_file(folder / "W_adj_matrix.csv", "graph file"),
            "zones": require_file(folder / "manhattan_zones.csv", "zones file")}


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    sp, gp, zp = files["series"], files["graph"], files["zones"]
    a, key = load_npz(sp, options.get("key"), prefer=("arr_0",))
    check_rank(a, (3,), str(sp), key, "time, zones, [inflow, outflow]")
    if a.shape[2] != 2:
        raise DataError(f"expected 2 channels (inflow, outflow), got shape {a.shape}", where=str(sp), field=key)
    if a.dtype.kind not in "fiu":
        raise DataError(f"dtype {a.dtype} is not numeric", where=str(sp), field=key)
    check_finite(a, str(sp), key)
    if (a < 0).any():
        raise DataError(f"{int((a < 0).sum())} negative flows", where=str(sp), field=key)
    n = a.shape[1]

    zones = read_csv(zp)
    for col in ("zone_id", "graph_id", "zone_name"):
        if col not in zones.columns:
            raise DataError(f"missing column '{col}' (has {list(zones.columns)})", where=str(zp), field=col)
    if len(zones) != n or sorted(zones["graph_id"].tolist()) != list(range(n)):
        raise DataError(f"graph_id must be 0..{n - 1} for the {n} zones of the series, got {len(zones)} rows",
                        where=str(zp), field="graph_id")
    zones = zones.sort_values("graph_id")
    node_ids = [str(z) for z in zones["zone_id"]]

    adj, labels = read_adjacency_csv(gp)
    info: dict[str, Any] = {"source": gp.name}
    edges, weights = graph_from_dense(adj, n, str(gp), info)
    if labels is not None and labels != [str(i) for i in range(n)]:
        raise DataError("header must be the graph ids 0..N-1 (the zones' graph_id)", where=str(gp), field="header")

    notes = [
        f"series: npz key '{key}', float64 {a.shape} cast to float32 (counts are whole numbers, exact)",
        "channels: 0 = inflow (trips ending in the zone), 1 = outflow (trips starting in it), per hour",
        f"time: hourly from {START} (2019-01-01..2020-12-31, 17544 h = 731 days); no timezone in the source, "
        "read as New York local time",
        "nodes: Manhattan taxi zones in graph_id order; node ids are TLC taxi zone ids "
        "(manhattan_zones.csv); names in provenance.zone_names",
        f"graph: {gp.name} is a binary zone-contiguity matrix whose header row is the graph ids 0..{n - 1}; "
        f"{'no self loops' if info['self_loops_in_source'] == 0 else str(info['self_loops_in_source']) + ' self loops dropped'}; "
        f"{'symmetric' if info['symmetric'] else 'not symmetric'}, {info['edges']} directed edges",
        "no coordinates: the repository ships zone polygons, not mirrored here",
    ]
    prov = provenance(files, fmt="nyc", origin=origin, licence=licence, notes=notes, graph=info,
                      zone_names={str(z): str(nm) for z, nm in zip(zones["zone_id"], zones["zone_name"])})
    city = City(name=name, series=a.astype(np.float32), start=pd.Timestamp(START), step_s=STEP_S,
                features=["inflow", "outflow"], units=["trips/h", "trips/h"], aggregation=["sum", "sum"],
                edges=edges, weights=weights, node_ids=node_ids, coords=None, missing="none",
                zeros_are_values=True, provenance=prov)
    return finish(city, sp)
