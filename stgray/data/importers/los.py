"""Los Angeles loop-detector speed (T-GCN's los_speed.csv / los_adj.csv, one week of METR-LA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.importers.common import (check_finite, finish, graph_from_dense, numeric_array,
                                          provenance, read_csv, require_file)
from stgray.data.importers.graphs import read_adjacency_csv, read_coords_csv
from stgray.errors import DataError

START = "2012-03-01 00:00"
STEP_S = 300


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    folder = path if path.is_dir() else path.parent
    files = {"series": require_file(folder / "los_speed.csv", "series file"),
             "graph": require_file(folder / "los_adj.csv", "graph file")}
    if options.get("coords"):
        files["coords"] = require_file(options["coords"], "coordinates file")
    return files


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    sp, gp = files["series"], files["graph"]
    df = read_csv(sp, dtype=str, keep_default_na=False)
    node_ids = [str(c).strip() for c in df.columns]
    if len(df) < 2 or not node_ids:
        raise DataError(f"expected a header of sensor ids and rows of speeds, got {df.shape}", where=str(sp))
    speed = numeric_array(df.to_numpy(), str(sp), "speed")
    check_finite(speed, str(sp), "speed")
    if (speed < 0).any():
        raise DataError(f"{int((speed < 0).sum())} negative speeds", where=str(sp), field="speed")
    n = speed.shape[1]
    adj, _ = read_adjacency_csv(gp)
    info: dict[str, Any] = {"source": gp.name}
    edges, weights = graph_from_dense(adj, n, str(gp), info)
    zeros = int((speed == 0).sum())
    days = speed.shape[0] * STEP_S / 86400
    notes = [
        f"series: {speed.shape[0]} x {n} speeds in mph every 5 min ({days:g} days); the file has no "
        f"timestamps: METR-LA starts {START} (Thursday) and this one-week subset is taken to start there "
        "too (checked: days 3 and 4 have no morning rush hour, i.e. Saturday and Sunday)",
        f"zeros mark missing readings in METR-LA; this subset has {zeros} (gaps were interpolated upstream)",
        f"graph: {gp.name} is a {adj.shape[0]}x{adj.shape[1]} Gaussian-kernel weight matrix without header "
        f"({'symmetric' if info['symmetric'] else 'directed'}); its {info['self_loops_in_source']} diagonal "
        f"self loops were dropped; {info['edges']} directed edges",
        "node ids: METR-LA sensor ids from the CSV header",
    ]
    coords = None
    if "coords" in files:
        coords = read_coords_csv(files["coords"], node_ids)
        notes.append(f"coords: sensor latitude/longitude from {files['coords'].name} (DCRNN)")
    prov = provenance(files, fmt="los", origin=origin, licence=licence, notes=notes, graph=info)
    city = City(name=name, series=speed[:, :, None].astype(np.float32), start=pd.Timestamp(START),
                step_s=STEP_S, features=["speed"], units=["mph"], aggregation=["mean"], edges=edges,
                weights=weights, node_ids=node_ids, coords=coords, missing="zero", zeros_are_values=False,
                provenance=prov)
    return finish(city, sp)
