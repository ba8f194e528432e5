"""Shared helpers of the importers: safe file reading, graph building, provenance.

Every reader here turns a missing, unreadable or malformed input into one ``DataError``
line that names the file and the field, before any compute is spent.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

import stgray
from stgray.data.city import City, edges_from_dense
from stgray.data.validate import validate_adjacency_shape, validate_city
from stgray.errors import DataError

EARTH_RADIUS_M = 6_371_008.8


# --- files ---------------------------------------------------------------------------

def require_file(path: str | Path, what: str = "file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} not found", where=str(p))
    if not p.is_file():
        raise DataError(f"{what} is not a regular file", where=str(p))
    return p


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", where=str(path)) from None
    return h.hexdigest()


def load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON (line {e.lineno}: {e.msg})", where=str(path)) from None
    except UnicodeDecodeError:
        raise DataError("not valid JSON (not UTF-8 text)", where=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", where=str(path)) from None


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, never unpickling objects."""
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as e:
        msg = "holds Python objects (pickled); refused" if "allow_pickle" in str(e) else \
            f"not a readable .npy file ({_first_line(e)})"
        raise DataError(msg, where=str(path)) from None
    except (OSError, EOFError) as e:
        raise DataError(f"not a readable .npy file ({_first_line(e)})", where=str(path)) from None
    if isinstance(a, np.lib.npyio.NpzFile):
        a.close()
        raise DataError("is an .npz archive, expected a single .npy array", where=str(path))
    return a


def load_npz(path: Path, key: str | None = None, *, prefer: Iterable[str] = ("arr_0", "data")) -> tuple[np.ndarray, str]:
    """One array of an ``.npz`` archive: ``key``, else the only one, else the first of ``prefer``."""
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"not a readable .npz archive ({_first_line(e)})", where=str(path)) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError("is a single .npy array, expected an .npz archive", where=str(path))
    with z:
        keys = list(z.files)
        if key is None:
            key = keys[0] if len(keys) == 1 else next((k for k in prefer if k in keys), None)
            if key is None:
                raise DataError(f"several arrays {keys}; say which one", where=str(path), field="key")
        if key not in keys:
            raise DataError(f"no array '{key}' (has {keys})", where=str(path), field=key)
        try:
            return z[key], key
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            msg = "holds Python objects (pickled); refused" if "allow_pickle" in str(e) else \
                f"unreadable ({_first_line(e)})"
            raise DataError(msg, where=str(path), field=key) from None


def read_csv(path: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kw)
    except pd.errors.EmptyDataError:
        raise DataError("empty CSV file", where=str(path)) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"not a readable CSV file ({_first_line(e)})", where=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", where=str(path)) from None


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pandas()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"not a readable Parquet file ({_first_line(e)})", where=str(path)) from None
    return read_csv(path)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:160]


def numeric_array(values: Any, where: str, field: str, dtype=np.float64) -> np.ndarray:
    """``values`` as a numeric array, or a DataError naming the first non-numeric cell."""
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        pass
    arr = np.asarray(values, dtype=object)
    for idx, v in np.ndenumerate(arr):
        try:
            float(v)
        except (TypeError, ValueError):
            raise DataError(f"non-numeric value {str(v)[:30]!r} at {idx}", where=where, field=field) from None
    raise DataError("values are not numeric", where=where, field=field)


def check_rank(a: np.ndarray, ranks: tuple[int, ...], where: str, field: str, what: str) -> None:
    if a.ndim not in ranks:
        raise DataError(f"expected rank {' or '.join(map(str, ranks))} ({what}), got shape {a.shape}",
                        where=where, field=field)


def check_finite(a: np.ndarray, where: str, field: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{int(bad.sum())} NaN/inf values (first at {idx})", where=where, field=field)


# --- graphs --------------------------------------------------------------------------

def graph_from_dense(adj: np.ndarray, num_nodes: int, where: str,
                     info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Edges and weights of a dense adjacency; self loops are dropped and counted in ``info``."""
    adj = numeric_array(adj, where, "graph")
    validate_adjacency_shape(adj, num_nodes, where)
    loops = int(np.count_nonzero(np.diag(adj)))
    edges, weights = edges_from_dense(adj, drop_self_loops=True)
    info.update(graph_summary(adj, edges))
    info["self_loops_in_source"] = loops
    if loops:
        info["self_loops"] = f"{loops} self loops (diagonal) dropped: models add their own"
    return edges, weights


def graph_summary(adj: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    a = np.array(adj, dtype=np.float64, copy=True)
    np.fill_diagonal(a, 0)
    vals = np.unique(a[a != 0])
    return {"edges": int(len(edges)), "symmetric": bool(np.array_equal(a, a.T)),
            "binary": bool(len(vals) == 1 and vals[0] == 1.0)}


def gaussian_kernel(d: np.ndarray, sigma: float | None = None) -> tuple[np.ndarray, float]:
    """``exp(-(d/sigma)^2)`` with sigma = std of ``d`` unless given (DCRNN's sensor graphs)."""
    d = np.asarray(d, dtype=np.float64)
    if sigma is None:
        sigma = float(d.std()) if d.size else 1.0
    if not math.isfinite(sigma) or sigma <= 0:
        sigma = float(d.mean()) if d.size and d.mean() > 0 else 1.0
    return np.exp(-np.square(d / sigma)), sigma


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres (inputs in degrees, broadcast)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def knn_graph(coords: np.ndarray, k: int = 8, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Gaussian-kernel k-nearest-neighbour graph from (lat, lon) degrees.

    Each node keeps its ``k`` nearest others (haversine distance); the relation is made
    symmetric (i -> j and j -> i); weight ``exp(-(d/sigma)^2)`` with sigma = std of the kNN
    distances, as DCRNN builds its sensor graphs from road distances.
    """
    n = len(coords)
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}", field="k")
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), {"method": "knn", "k": 0}
    lat, lon = coords[:, 0], coords[:, 1]
    nbr = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float64)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        d = haversine_m(lat[s:e, None], lon[s:e, None], lat[None, :], lon[None, :])
        d[np.arange(e - s), np.arange(s, e)] = np.inf  # not its own neighbour
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        nbr[s:e] = part
        dist[s:e] = np.take_along_axis(d, part, 1)
    w, sigma = gaussian_kernel(dist)
    src = np.repeat(np.arange(n), k)
    pairs = np.concatenate([np.stack([src, nbr.ravel()], 1), np.stack([nbr.ravel(), src], 1)])
    ww = np.concatenate([w.ravel(), w.ravel()])
    key = pairs[:, 0] * n + pairs[:, 1]
    _, first = np.unique(key, return_index=True)  # symmetric distances: duplicates agree
    edges, weights = pairs[first], ww[first].astype(np.float32)
    info = {"method": "gaussian-kernel kNN on haversine distances (DCRNN-style)", "k": int(k),
            "sigma_m": round(sigma, 3), "weight": "exp(-(d/sigma)^2), sigma = std of kNN distances",
            "symmetrised": True, "edges": int(len(edges))}
    return edges.astype(np.int64), weights, info


# --- projections ---------------------------------------------------------------------

_WGS84_A = 6_378_137.0
_WGS84_F = 1 / 298.257223563


def _utm_constants():
    n = _WGS84_F / (2 - _WGS84_F)
    big_a = _WGS84_A / (1 + n) * (1 + n**2 / 4 + n**4 / 64)
    alpha = (n / 2 - 2 * n**2 / 3 + 5 * n**3 / 16, 13 * n**2 / 48 - 3 * n**3 / 5, 61 * n**3 / 240)
    beta = (n / 2 - 2 * n**2 / 3 + 37 * n**3 / 96, n**2 / 48 + n**3 / 15, 17 * n**3 / 480)
    delta = (2 * n - 2 * n**2 / 3 - 2 * n**3, 7 * n**2 / 3 - 8 * n**3 / 5, 56 * n**3 / 15)
    return n, big_a, alpha, beta, delta


def utm_to_latlon(easting, northing, zone: int, south: bool) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 UTM -> (lat, lon) degrees (Krüger series to n^3: sub-millimetre in a zone)."""
    n, big_a, _, beta, delta = _utm_constants()
    k0 = 0.9996
    xi = (np.asarray(northing, dtype=np.float64) - (10_000_000.0 if south else 0.0)) / (k0 * big_a)
    eta = (np.asarray(easting, dtype=np.float64) - 500_000.0) / (k0 * big_a)
    xi_p, eta_p = xi.copy(), eta.copy()
    for j, b in enumerate(beta, start=1):
        xi_p -= b * np.sin(2 * j * xi) * np.cosh(2 * j * eta)
        eta_p -= b * np.cos(2 * j * xi) * np.sinh(2 * j * eta)
    chi = np.arcsin(np.sin(xi_p) / np.cosh(eta_p))
    phi = chi.copy()
    for j, d in enumerate(delta, start=1):
        phi += d * np.sin(2 * j * chi)
    lon0 = np.radians(zone * 6 - 183)
    lam = lon0 + np.arctan2(np.sinh(eta_p), np.cos(xi_p))
    return np.degrees(phi), np.degrees(lam)


def latlon_to_utm(lat, lon, zone: int, south: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) degrees -> WGS84 UTM (easting, northing); the inverse of ``utm_to_latlon``."""
    n, big_a, alpha, _, _ = _utm_constants()
    k0 = 0.9996
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    dlam = np.radians(np.asarray(lon, dtype=np.float64)) - np.radians(zone * 6 - 183)
    c = 2 * np.sqrt(n) / (1 + n)
    t = np.sinh(np.arctanh(np.sin(phi)) - c * np.arctanh(c * np.sin(phi)))
    xi_p = np.arctan2(t, np.cos(dlam))
    eta_p = np.arctanh(np.sin(dlam) / np.sqrt(1 + t**2))
    e = eta_p.copy()
    nn = xi_p.copy()
    for j, a in enumerate(alpha, start=1):
        e += a * np.cos(2 * j * xi_p) * np.sinh(2 * j * eta_p)
        nn += a * np.sin(2 * j * xi_p) * np.cosh(2 * j * eta_p)
    return 500_000.0 + k0 * big_a * e, (10_000_000.0 if south else 0.0) + k0 * big_a * nn


# --- provenance ----------------------------------------------------------------------

def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "path": str(path.resolve())}


def provenance(files: dict[str, Path], *, fmt: str, origin: dict[str, Any] | None = None,
               licence: str | None = None, notes: list[str] | None = None,
               **extra: Any) -> dict[str, Any]:
    """The provenance record every importer attaches: files + checksums, origin, notes."""
    p: dict[str, Any] = {
        "format": fmt,
        "files": {role: {"name": path.name, **file_record(path)} for role, path in files.items()},
        "origin": origin or {"kind": "user-supplied files"},
        "licence": licence or "unknown (user-supplied)",
        "notes": list(notes or []),
        "imported_by": f"stgray {stgray.__version__}",
    }
    p.update(extra)
    return p


def finish(city: City, where: str | Path) -> City:
    """Validate the city (one DataError line naming ``where``), note oddities, return it.

    ``provenance["checks"]`` lists nodes without any edge and nodes whose whole series is
    zero (e.g. NYC's island zones): real properties of the data a user should know about.
    """
    validate_city(city, where=str(where))
    deg = np.bincount(city.edges.ravel(), minlength=city.num_nodes) if len(city.edges) else \
        np.zeros(city.num_nodes, dtype=np.int64)
    zero = np.nan_to_num(np.abs(city.series)).reshape(city.num_steps, city.num_nodes, -1).sum((0, 2)) == 0
    city.provenance["checks"] = {
        "isolated_nodes": [city.node_ids[i] for i in np.nonzero(deg == 0)[0]],
        "all_zero_nodes": [city.node_ids[i] for i in np.nonzero(zero)[0]],
    }
    return city
