"""Montevideo bus-stop passenger inflow (PyTorch Geometric Temporal's montevideo_bus.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.importers.common import (check_finite, finish, gaussian_kernel, haversine_m, load_json,
                                          numeric_array, provenance, require_file, utm_to_latlon)
from stgray.errors import DataError

START = "2020-10-01 00:00"
STEP_S = 3600
UTM_ZONE, UTM_SOUTH = 21, True  # EPSG:32721, WGS 84 / UTM zone 21S (Montevideo is at 56.2 W, 34.9 S)


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    p = path / "montevideo_bus.json" if path.is_dir() else path
    return {"series": require_file(p, "series file")}


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    p = files["series"]
    where = str(p)
    d = load_json(p)
    if not isinstance(d, dict):
        raise DataError("expected a JSON object with 'nodes' and 'links'", where=where)
    for key in ("nodes", "links"):
        if not isinstance(d.get(key), list):
            raise DataError(f"missing list '{key}'", where=where, field=key)
    nodes, links = d["nodes"], d["links"]
    if not nodes:
        raise DataError("no nodes", where=where, field="nodes")
    for field in ("y", "bus_stop"):
        bad = next((i for i, x in enumerate(nodes) if not isinstance(x, dict) or field not in x), None)
        if bad is not None:
            raise DataError(f"node {bad} has no '{field}'", where=where, field=f"nodes[].{field}")
    lengths = {len(x["y"]) if isinstance(x["y"], list) else -1 for x in nodes}
    if len(lengths) != 1 or -1 in lengths:
        raise DataError(f"nodes[].y must be lists of one length, got lengths {sorted(lengths)[:5]}",
                        where=where, field="nodes[].y")
    y = numeric_array([x["y"] for x in nodes], where, "nodes[].y").T  # (T, N)
    check_finite(y, where, "nodes[].y")
    if (y < 0).any():
        raise DataError(f"{int((y < 0).sum())} negative counts", where=where, field="nodes[].y")
    stops = [str(x["bus_stop"]) for x in nodes]
    if len(set(stops)) != len(stops):
        raise DataError("bus_stop ids are not unique", where=where, field="nodes[].bus_stop")
    n = len(stops)
    notes = [f"series: nodes[].y, {y.shape[0]} hourly passenger boardings per stop from {START} "
             "(October 2020, local time; the source gives the month, the hour count fixes the start)"]

    # --- graph: directed bus-line links, weight = distance in metres ---------------------
    pos = {s: i for i, s in enumerate(stops)}
    try:
        src = [str(l["source"]) for l in links]
        dst = [str(l["target"]) for l in links]
        dist = numeric_array([l["weight"] for l in links], where, "links[].weight")
    except (KeyError, TypeError):
        raise DataError("every link needs source, target and weight", where=where, field="links") from None
    if all(s in pos for s in src + dst):
        endpoints = "bus_stop ids"
        si = np.array([pos[s] for s in src], dtype=np.int64)
        ti = np.array([pos[t] for t in dst], dtype=np.int64)
    elif all(s.isdigit() and int(s) < n for s in src + dst):
        endpoints = "node indices"
        si, ti = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
    else:
        bad = next(s for s in src + dst if s not in pos)
        raise DataError(f"link endpoint '{bad}' is not a bus_stop id", where=where, field="links[].source")
    check_finite(dist, where, "links[].weight")
    if (dist < 0).any():
        raise DataError(f"{int((dist < 0).sum())} negative distances", where=where, field="links[].weight")
    loops = si == ti
    si, ti, dist = si[~loops], ti[~loops], dist[~loops]
    key = si * n + ti
    _, first = np.unique(key, return_index=True)
    dup = len(key) - len(first)
    si, ti, dist = si[first], ti[first], dist[first]
    w, sigma = gaussian_kernel(dist)
    info = {"source": "links[]", "endpoints": endpoints, "edges": int(len(si)),
            "self_loops_in_source": int(loops.sum()), "duplicates_dropped": int(dup),
            "weight": f"Gaussian kernel of road distance: exp(-(d/sigma)^2), sigma = std of the "
                      f"{len(dist)} link distances = {sigma:.1f} m (DCRNN)",
            "distance_m": {"min": float(dist.min()), "median": float(np.median(dist)), "max": float(dist.max())}}
    info["weights_below_1e-3"] = int((w.astype(np.float32) < 1e-3).sum())
    info["weights_zero_float32"] = int((w.astype(np.float32) == 0).sum())
    notes.append(f"graph: links[] are directed bus-line hops; their source/target are {endpoints}; "
                 f"weight is road distance in metres, turned into a similarity exp(-(d/sigma)^2) with "
                 f"sigma = {sigma:.1f} m (std of the distances); median weight {float(np.median(w)):.3f}, "
                 f"{info['weights_below_1e-3']} links below 1e-3 ({info['weights_zero_float32']} underflow "
                 "to 0 in float32) - kept as edges")

    # --- coordinates: projected metres -> degrees ------------------------------------------
    coords = None
    if all("lat" in x and "lon" in x for x in nodes):
        northing = numeric_array([x["lat"] for x in nodes], where, "nodes[].lat")
        easting = numeric_array([x["lon"] for x in nodes], where, "nodes[].lon")
        check_finite(northing, where, "nodes[].lat")
        check_finite(easting, where, "nodes[].lon")
        if (np.abs(northing) <= 90).all() and (np.abs(easting) <= 180).all():
            coords = np.stack([northing, easting], 1)
            notes.append("coords: lat/lon already in degrees")
        else:
            lat, lon = utm_to_latlon(easting, northing, UTM_ZONE, UTM_SOUTH)
            coords = np.stack([lat, lon], 1)
            ratio = dist / np.maximum(haversine_m(lat[si], lon[si], lat[ti], lon[ti]), 1e-6)
            med = float(np.median(ratio))
            info["road_over_straight_distance_median"] = round(med, 4)
            notes.append(
                "coords: the source's lat/lon fields are projected metres (lat = northing "
                f"{northing.min():.0f}..{northing.max():.0f}, lon = easting {easting.min():.0f}.."
                f"{easting.max():.0f}); read as WGS 84 / UTM zone 21S (EPSG:32721) and converted "
                f"to degrees (lat {lat.min():.4f}..{lat.max():.4f}, lon {lon.min():.4f}..{lon.max():.4f}); "
                f"check: link road distance / great-circle distance between its stops has median {med:.3f}")
            if not (0.9 < med < 1.2 and -35.2 < lat.mean() < -34.6 and -56.6 < lon.mean() < -55.9):
                coords = None
                notes.append("coords: the conversion does not land in Montevideo; coords left out")
    prov = provenance(files, fmt="montevideo", origin=origin, licence=licence, notes=notes, graph=info)
    city = City(name=name, series=y[:, :, None].astype(np.float32), start=pd.Timestamp(START), step_s=STEP_S,
                features=["inflow"], units=["passengers/h"], aggregation=["sum"],
                edges=np.stack([si, ti], 1), weights=w.astype(np.float32), node_ids=stops, coords=coords,
                missing="none", zeros_are_values=True, provenance=prov)
    return finish(city, p)
