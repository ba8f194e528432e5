"""Graph inputs of user datasets: a dense adjacency, an edge list, a DCRNN pickle or coordinates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stgray.data.importers.common import (check_finite, gaussian_kernel, graph_from_dense, knn_graph,
                                          load_npy, numeric_array, read_csv, require_file)
from stgray.data.importers.safe_pickle import safe_load
from stgray.errors import DataError

DISTANCE_COLUMNS = ("distance", "dist", "cost", "length", "meters", "metres")


def _is_number(s: Any) -> bool:
    try:
        float(s)
    except (TypeError, ValueError):
        return False
    return s == s and str(s).strip() != ""  # NaN / empty cells are not numbers here


def read_adjacency_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """A square matrix in CSV; an optional header row and index column are detected.

    Returns the matrix and the header labels when there was a header.
    """
    raw = read_csv(path, header=None, dtype=str, keep_default_na=False)
    cells = raw.to_numpy()
    labels = None
    r, c = cells.shape
    if r and (not all(_is_number(x) for x in cells[0][1:]) or not _is_number(cells[0][0]) or r == c + 1):
        labels = [str(x).strip() for x in cells[0]]
        cells = cells[1:]
    r, c = cells.shape
    if c == r + 1 or (r and not all(_is_number(x) for x in cells[:, 0])):
        cells = cells[:, 1:]  # an index column
        if labels is not None and len(labels) == c:
            labels = labels[1:]
    try:
        adj = np.char.strip(cells.astype(str)).astype(np.float64)
    except ValueError:
        for (i, j), v in np.ndenumerate(cells):
            if not _is_number(str(v).strip()) and str(v).strip().lower() not in ("nan", "inf", "-inf"):
                raise DataError(f"non-numeric value {str(v)[:30]!r} at row {i}, column {j}",
                                where=str(path), field="graph") from None
        raise DataError("non-numeric values", where=str(path), field="graph") from None
    return adj, labels


def _order_by_labels(adj: np.ndarray, labels: list[str] | None, node_ids: list[str],
                     info: dict[str, Any]) -> np.ndarray:
    """Permute a labelled adjacency to the series' node order when its labels are the node ids."""
    if labels is None or len(labels) != adj.shape[0] or sorted(labels) != sorted(node_ids):
        return adj
    if labels == list(node_ids):
        info["order"] = "header matches series node ids"
        return adj
    pos = {lab: i for i, lab in enumerate(labels)}
    perm = [pos[n] for n in node_ids]
    info["order"] = "rows/columns reordered from the header's node ids to the series order"
    return adj[np.ix_(perm, perm)]


def read_edge_list(path: Path, node_ids: list[str], info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``source,target[,weight]`` rows; endpoints are node ids (or 0-based indices).

    A weight column named like a distance (distance, cost, length, ...) is turned into a
    similarity with the Gaussian kernel ``exp(-(d/sigma)^2)``, sigma = std of the distances.
    """
    raw = read_csv(path, header=None, dtype=str, keep_default_na=False)
    if raw.shape[1] not in (2, 3):
        raise DataError(f"edge list needs 2 or 3 columns (source,target[,weight]), got {raw.shape[1]}",
                        where=str(path), field="graph")
    cells = raw.to_numpy()
    header = None
    first = [str(x).strip() for x in cells[0]] if len(cells) else []
    id_set = set(node_ids)
    if first and not (first[0] in id_set and first[1] in id_set) and \
            not (_is_number(first[0]) and _is_number(first[1])):
        header, cells = [h.lower() for h in first], cells[1:]
    if len(cells) == 0:
        raise DataError("edge list has no rows", where=str(path), field="graph")
    src = [str(x).strip() for x in cells[:, 0]]
    dst = [str(x).strip() for x in cells[:, 1]]
    pos = {n: i for i, n in enumerate(node_ids)}
    if all(s in pos for s in src) and all(d in pos for d in dst):
        s_idx = np.array([pos[s] for s in src]); d_idx = np.array([pos[d] for d in dst])
        info["endpoints"] = "node ids"
    elif all(x.lstrip("-").isdigit() for x in src + dst):
        s_idx = np.array([int(s) for s in src]); d_idx = np.array([int(d) for d in dst])
        bad = np.concatenate([s_idx, d_idx])
        bad = bad[(bad < 0) | (bad >= len(node_ids))]
        if bad.size:
            raise DataError(f"edge endpoint {int(bad[0])} is neither a node id nor an index < "
                            f"{len(node_ids)}", where=str(path), field="graph")
        info["endpoints"] = "0-based node indices"
    else:
        unknown = next(x for x in src + dst if x not in pos)
        raise DataError(f"edge endpoint '{unknown[:30]}' is not a node id of the series",
                        where=str(path), field="graph")
    if cells.shape[1] == 3:
        w = numeric_array([str(x).strip() for x in cells[:, 2]], str(path), "weight")
        check_finite(w, str(path), "weight")
        if (w < 0).any():
            raise DataError(f"{int((w < 0).sum())} negative edge weights", where=str(path), field="weight")
        if header is not None and header[2] in DISTANCE_COLUMNS:
            w, sigma = gaussian_kernel(w)
            info["weight"] = f"Gaussian kernel of column '{header[2]}': exp(-(d/sigma)^2), sigma={sigma:.4g}"
        else:
            info["weight"] = "as given"
    else:
        w = np.ones(len(s_idx))
        info["weight"] = "1 (unweighted edge list)"
    a = np.zeros((len(node_ids), len(node_ids)))
    a[s_idx, d_idx] = w  # a repeated pair keeps its last weight
    loops = int(np.count_nonzero(np.diag(a)))
    np.fill_diagonal(a, 0)
    sd, td = np.nonzero(a)
    info.update({"source": "edge list", "rows": int(len(s_idx)), "edges": int(len(sd)),
                 "self_loops_in_source": loops, "symmetric": bool(np.array_equal(a, a.T))})
    if loops:
        info["self_loops"] = f"{loops} self loops dropped: models add their own"
    return np.stack([sd, td], 1).astype(np.int64), a[sd, td].astype(np.float32)


def read_dcrnn_pickle(path: Path) -> tuple[list[str], np.ndarray]:
    """DCRNN's ``adj_mx.pkl``: (sensor_ids, sensor_id_to_index, adj), loaded safely."""
    obj = safe_load(path)
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3):
        raise DataError("expected (sensor_ids, sensor_id_to_index, adj_mx)", where=str(path))
    ids, id_to_ind, adj = obj
    if not isinstance(adj, np.ndarray) or adj.dtype.kind not in "fiub":
        raise DataError("third element is not a numeric matrix", where=str(path), field="adj_mx")
    ids = [x.decode() if isinstance(x, bytes) else str(x) for x in ids]
    if adj.ndim != 2 or adj.shape != (len(ids), len(ids)):
        raise DataError(f"adjacency {adj.shape} does not match {len(ids)} sensor ids",
                        where=str(path), field="adj_mx")
    if isinstance(id_to_ind, dict):
        for i, s in enumerate(ids):
            j = id_to_ind.get(s, id_to_ind.get(s.encode(), i)) if isinstance(s, str) else i
            if j != i:
                raise DataError(f"sensor_id_to_index maps '{s}' to {j}, not {i}", where=str(path),
                                field="sensor_id_to_index")
    return ids, np.asarray(adj, dtype=np.float64)


def read_coords_csv(path: Path, node_ids: list[str]) -> np.ndarray:
    """``node_id,lat,lon`` (any order of columns with those names; DCRNN's sensor_id/latitude/longitude too)."""
    df = read_csv(path, dtype=str, keep_default_na=False)
    cols = {c.strip().lower(): c for c in df.columns}
    pick = lambda *names: next((cols[n] for n in names if n in cols), None)  # noqa: E731
    c_id = pick("node_id", "sensor_id", "id", "node", "station", "bus_stop")
    c_lat = pick("lat", "latitude", "y")
    c_lon = pick("lon", "lng", "longitude", "x")
    if c_lat is None or c_lon is None:
        raise DataError(f"needs columns lat and lon (has {list(df.columns)[:6]})", where=str(path),
                        field="lat" if c_lat is None else "lon")
    if c_id is None:
        if len(df) != len(node_ids):
            raise DataError(f"no node_id column and {len(df)} rows for {len(node_ids)} nodes",
                            where=str(path), field="node_id")
        order = np.arange(len(df))
    else:
        ids = [str(x).strip() for x in df[c_id]]
        pos = {n: i for i, n in enumerate(ids)}
        missing = [n for n in node_ids if n not in pos]
        if missing:
            raise DataError(f"{len(missing)} nodes have no coordinates (e.g. '{missing[0]}')",
                            where=str(path), field=c_id)
        order = np.array([pos[n] for n in node_ids])
    lat = numeric_array([str(x).strip() for x in df[c_lat]], str(path), c_lat)[order]
    lon = numeric_array([str(x).strip() for x in df[c_lon]], str(path), c_lon)[order]
    coords = np.stack([lat, lon], 1)
    check_finite(coords, str(path), "lat/lon")
    if (np.abs(lat) > 90).any() or (np.abs(lon) > 180).any():
        raise DataError("lat/lon outside [-90, 90] x [-180, 180]: not degrees (projected?)",
                        where=str(path), field="lat/lon")
    return coords


def load_graph(node_ids: list[str], *, graph: str | Path | None, coords: str | Path | None,
               k: int = 8, files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Edges, weights, coords and a graph note for user datasets.

    ``graph``: an adjacency CSV (square, optional header/index), an edge-list CSV
    (source,target[,weight]), a ``.npy`` matrix or a DCRNN ``adj_mx.pkl``. Without it,
    ``coords`` (node_id,lat,lon CSV) gives a Gaussian-kernel kNN graph.
    """
    n = len(node_ids)
    info: dict[str, Any] = {}
    xy = None
    if coords is not None:
        cp = require_file(coords, "coordinates file")
        files["coords"] = cp
        xy = read_coords_csv(cp, node_ids)
    if graph is None:
        if xy is None:
            raise DataError("no graph: give an adjacency/edge-list file (--graph) or node "
                            "coordinates (--coords) to build a kNN graph", field="graph")
        edges, weights, info = knn_graph(xy, k=k)
        info["source"] = f"kNN from {files['coords'].name}"
        return edges, weights, xy, info
    gp = require_file(graph, "graph file")
    files["graph"] = gp
    where = str(gp)
    suffix = gp.suffix.lower()
    if suffix == ".pkl" or suffix == ".pickle":
        ids, adj = read_dcrnn_pickle(gp)
        info["source"] = f"DCRNN adjacency pickle {gp.name} (restricted unpickler)"
        adj = _order_by_labels(adj, ids, node_ids, info)
        if sorted(ids) != sorted(node_ids):
            extra = sorted(set(node_ids) - set(ids))
            raise DataError(f"graph sensors differ from the series columns"
                            f"{f' (e.g. series has {extra[0]!r})' if extra else ''}",
                            where=where, field="sensor_ids")
    elif suffix == ".npy":
        adj = load_npy(gp)
        info["source"] = f"dense matrix {gp.name}"
    elif suffix in (".csv", ".txt", ".tsv"):
        raw = read_csv(gp, header=None, dtype=str, keep_default_na=False, nrows=3)
        if raw.shape[1] in (2, 3) and n > 3:
            edges, weights = read_edge_list(gp, node_ids, info)
            info["file"] = gp.name
            return edges, weights, xy, info
        adj, labels = read_adjacency_csv(gp)
        info["source"] = f"dense matrix {gp.name}"
        adj = _order_by_labels(adj, labels, node_ids, info)
    else:
        raise DataError(f"unknown graph format '{suffix}' (use .csv adjacency/edge list, .npy or "
                        "DCRNN .pkl)", where=where, field="graph")
    edges, weights = graph_from_dense(adj, n, where, info)
    return edges, weights, xy, info
