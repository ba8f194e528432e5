"""Hangzhou metro station in/out flow (transdim's Hangzhou data set, Tianchi AFC records)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City, edges_from_dense
from stgray.data.importers.common import (check_finite, finish, graph_summary, provenance,
                                          require_file)
from stgray.data.importers.graphs import read_adjacency_csv
from stgray.data.validate import validate_adjacency_shape
from stgray.errors import DataError

START = "2019-01-01 00:00"
STEP_S = 600
# The network had 81 stations (ids 0..80); the AFC records have no trip at station 54 in
# the whole period, and the published 80-station tensors leave it out (the data set's
# author: "inflow and outflow trips at station #54 are missing for the entire period").
MISSING_STATION = 54


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    folder = path if path.is_dir() else path.parent
    return {"inflow": require_file(folder / "inflow_tensor.mat", "inflow file"),
            "outflow": require_file(folder / "outflow_tensor.mat", "outflow file"),
            "graph": require_file(folder / "graph.csv", "graph file")}


def load_mat(path: Path, key: str) -> np.ndarray:
    import scipy.io

    try:
        m = scipy.io.loadmat(path)  # MATLAB v5 numeric arrays; never unpickles
    except NotImplementedError:
        raise DataError("MATLAB v7.3 (HDF5) files are not supported; save as v5", where=str(path)) from None
    except Exception as e:  # scipy raises ValueError/TypeError/MatReadError on corrupt files
        raise DataError(f"not a readable MATLAB file ({type(e).__name__}: {str(e)[:100]})",
                        where=str(path)) from None
    if key not in m:
        keys = [k for k in m if not k.startswith("__")]
        raise DataError(f"no variable '{key}' (has {keys})", where=str(path), field=key)
    a = m[key]
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
        raise DataError(f"variable is not a numeric array ({getattr(a, 'dtype', type(a))})",
                        where=str(path), field=key)
    if a.ndim != 3:
        raise DataError(f"expected rank 3 (stations, days, slots of day), got shape {a.shape}",
                        where=str(path), field=key)
    check_finite(a, str(path), key)
    if (a < 0).any():
        raise DataError(f"{int((a < 0).sum())} negative flows", where=str(path), field=key)
    return a


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    ip, op, gp = files["inflow"], files["outflow"], files["graph"]
    inflow = load_mat(ip, "inflow_tensor")
    outflow = load_mat(op, "outflow_tensor")
    if inflow.shape != outflow.shape:
        raise DataError(f"outflow shape {outflow.shape} differs from inflow {inflow.shape}",
                        where=str(op), field="outflow_tensor")
    n, days, slots = inflow.shape
    if slots * STEP_S != 86400:
        raise DataError(f"expected 144 ten-minute slots per day, got {slots}", where=str(ip), field="inflow_tensor")
    # (stations, days, slots) -> (days*slots, stations): day-major, slot-minor time axis
    series = np.stack([x.transpose(1, 2, 0).reshape(days * slots, n) for x in (inflow, outflow)], 2)

    adj, labels = read_adjacency_csv(gp)
    notes = [
        f"series: inflow_tensor/outflow_tensor {inflow.shape} (stations x days x 10-min slots, uint16) "
        f"reshaped day-major to {series.shape}; starts {START} (Tianchi AFC data, 2019-01-01..25, local time)",
    ]
    info: dict[str, Any] = {"source": gp.name}
    node_ids = [str(i) for i in range(n)]
    if adj.shape == (n + 1, n + 1):
        drop = MISSING_STATION
        if labels is not None and len(labels) == n + 1 and labels != [str(i) for i in range(n + 1)]:
            raise DataError(f"header should be station ids 0..{n}", where=str(gp), field="header")
        keep = [i for i in range(n + 1) if i != drop]
        nbrs = sorted(set(np.nonzero(adj[drop])[0]) | set(np.nonzero(adj[:, drop])[0]) - {drop})
        sub = adj[np.ix_(keep, keep)].copy()
        bridged = []
        for u in nbrs:
            for v in nbrs:
                if u < v and adj[u, v] == 0:
                    iu, iv = keep.index(u), keep.index(v)
                    sub[iu, iv] = sub[iv, iu] = 1.0
                    bridged.append(f"{u}-{v}")
        node_ids = [str(i) for i in keep]
        notes.append(
            f"graph: {gp.name} has {n + 1} stations (ids 0..{n}) but the flow tensors have {n}; station "
            f"{drop} was dropped: the data set's author states its in/out trips are missing for the whole "
            f"period, so the tensors are stations 0..{n} without {drop}. The extra index {n} is a real "
            f"station (linked to {', '.join(str(int(x)) for x in np.nonzero(adj[n])[0])}), not padding.")
        if bridged:
            notes.append(f"graph: station {drop} lay between {', '.join(str(int(u)) for u in nbrs)} on its line; "
                         f"they were linked directly ({', '.join(bridged)}, both directions, weight 1) so the "
                         "line stays connected (trains run through the station)")
        info.update({"dropped_station": drop, "bridged": bridged})
        adj = sub
    validate_adjacency_shape(adj, n, str(gp))
    loops = int(np.count_nonzero(np.diag(adj)))
    edges, weights = edges_from_dense(adj, drop_self_loops=True)
    info.update(graph_summary(adj, edges))
    info["self_loops_in_source"] = loops
    notes.append(f"graph: binary station adjacency (metro lines), {'symmetric' if info['symmetric'] else 'directed'}, "
                 f"{len(edges)} directed edges, {loops} self loops in source")
    notes.append("node ids are the original station ids (0..80 without 54); no coordinates in the source")
    prov = provenance(files, fmt="hangzhou", origin=origin, licence=licence, notes=notes, graph=info)
    city = City(name=name, series=series.astype(np.float32), start=pd.Timestamp(START), step_s=STEP_S,
                features=["inflow", "outflow"], units=["passengers/10min", "passengers/10min"],
                aggregation=["sum", "sum"], edges=edges, weights=weights, node_ids=node_ids, coords=None,
                missing="none", zeros_are_values=True, provenance=prov)
    return finish(city, ip)
