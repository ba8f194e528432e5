"""Importers: raw public or user files -> a validated canonical ``City``.

``resolve`` finds the files of a named dataset (``stgray.data.sources``) or of a path and
the format that reads them; ``load`` reads them. Formats:

- ``nyc``, ``hangzhou``, ``montevideo``, ``los``: the layouts of the shared public datasets;
- ``hdf5``: a METR-LA / PEMS-BAY-style pandas HDF5 frame (+ a graph: DCRNN ``adj_mx.pkl``,
  adjacency or edge-list CSV, or coordinates for a kNN graph);
- ``npy``: ``dataset.npy`` + ``matrix.npy`` pairs (STGP / transfer-benchmark style) or one
  ``.npz`` series; the step must be given;
- ``table``: bring your own city, a CSV/Parquet table of a timestamp column + one column
  per node, with a graph file or node coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stgray.data.city import City
from stgray.data.importers import arrays, hangzhou, hdf5, los, montevideo, nyc, table
from stgray.data.importers.common import require_file
from stgray.data.importers.user import USER_OPTIONS
from stgray.errors import DataError


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    inputs: Callable[[Path, dict[str, Any]], dict[str, Path]]
    load: Callable[..., City]
    options: tuple[str, ...] = ()
    user: bool = False  # takes graph/coords options


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("nyc", "Deep-NYC-Taxi-Bike folder: *-NYC{bike,taxi}-inoutflow.npz + W_adj_matrix.csv + "
           "manhattan_zones.csv", nyc.inputs, nyc.load, ("mode", "key")),
    Format("hangzhou", "transdim Hangzhou folder: inflow_tensor.mat + outflow_tensor.mat + graph.csv",
           hangzhou.inputs, hangzhou.load),
    Format("montevideo", "PyG-Temporal montevideo_bus.json (nodes[].y, links[])", montevideo.inputs,
           montevideo.load),
    Format("los", "T-GCN folder: los_speed.csv + los_adj.csv", los.inputs, los.load, ("coords",)),
    Format("hdf5", "pandas HDF5 frame (METR-LA/PEMS-BAY .h5) + --graph/--coords", hdf5.inputs, hdf5.load,
           USER_OPTIONS, user=True),
    Format("npy", "dataset.npy (T,N[,F]) + matrix.npy (N,N), or one .npz series; needs --step",
           arrays.inputs, arrays.load, USER_OPTIONS, user=True),
    Format("table", "CSV/Parquet: timestamp column + one column per node, + --graph/--coords",
           table.inputs, table.load, USER_OPTIONS, user=True),
]}


@dataclass
class Resolved:
    """What to import: a name, a format, its input files and options."""

    name: str
    fmt: str
    files: dict[str, Path]
    options: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Any] | None = None
    licence: str | None = None
    dataset: str | None = None  # registry name, when a named dataset

    def load(self) -> City:
        return FORMATS[self.fmt].load(self.files, name=self.name, options=self.options,
                                      origin=self.origin, licence=self.licence)


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}' (known: {', '.join(FORMATS)})", field="format")
    return FORMATS[fmt]


def detect_format(path: Path) -> str:
    """The format of a file or folder from its names; DataError when it cannot tell."""
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if "montevideo_bus.json" in names:
            return "montevideo"
        if {"los_speed.csv", "los_adj.csv"} <= names:
            return "los"
        if {"inflow_tensor.mat", "outflow_tensor.mat"} <= names:
            return "hangzhou"
        if "W_adj_matrix.csv" in names and any(n.endswith("-inoutflow.npz") for n in names):
            return "nyc"
        if "dataset.npy" in names:
            return "npy"
        suffixes = [Path(n).suffix.lower() for n in names]
        if sum(s in hdf5.SUFFIXES for s in suffixes) == 1:
            return "hdf5"
        if sum(s in table.SUFFIXES for s in suffixes) == 1:
            return "table"
        raise DataError("cannot tell the dataset format of this folder; give --format "
                        f"({', '.join(FORMATS)})", where=str(path), field="format")
    s = path.suffix.lower()
    if s in hdf5.SUFFIXES:
        return "hdf5"
    if s == ".npy":
        return "npy"
    if s == ".npz":
        if "-NYC" in path.name and (path.parent / "W_adj_matrix.csv").is_file():
            return "nyc"
        return "npy"
    if s == ".json":
        return "montevideo"
    if s == ".mat":
        return "hangzhou"
    if s in table.SUFFIXES:
        if path.name == "los_speed.csv" and (path.parent / "los_adj.csv").is_file():
            return "los"
        return "table"
    raise DataError(f"unknown format '{s or path.name}' (known: .h5, .npy, .npz, .csv, .parquet, .json, "
                    f".mat; or give --format: {', '.join(FORMATS)})", where=str(path), field="format")


def resolve(source: str | Path, *, fmt: str | None = None, options: dict[str, Any] | None = None,
            data_dir: str | Path | None = None) -> Resolved:
    """A named dataset (see ``stgray.data.sources.DATASETS``) or a path, with its files found."""
    from stgray.data import sources

    opts = {k: v for k, v in (options or {}).items() if v is not None}
    name = opts.pop("name", None)
    src = str(source)
    if src in sources.DATASETS:
        spec = sources.get_spec(src)
        if fmt is not None and fmt != spec.fmt:
            raise DataError(f"dataset '{src}' has format '{spec.fmt}', not '{fmt}'", field="format")
        _check_options(spec.fmt, opts, named=True)
        return Resolved(name=name or spec.name, fmt=spec.fmt, files=sources.local_files(src, data_dir),
                        options={**spec.options, **opts}, origin=spec.origin_record(), licence=spec.licence,
                        dataset=spec.name)
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"no such file, folder or dataset name (datasets: {', '.join(sources.DATASETS)})",
                        where=src)
    fmt = fmt or detect_format(path)
    f = get_format(fmt)
    _check_options(fmt, opts, named=False)
    files = f.inputs(path, opts)
    if f.user:
        for role in ("graph", "coords"):
            if opts.get(role):
                files[role] = require_file(opts[role], "graph file" if role == "graph" else "coordinates file")
    default_name = path.name if path.is_dir() else path.stem
    return Resolved(name=name or default_name, fmt=fmt, files=files, options=opts)


def _check_options(fmt: str, opts: dict[str, Any], named: bool) -> None:
    allowed = set(get_format(fmt).options)
    if named:
        allowed -= {"mode", "coords"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise DataError(f"option '{bad[0]}' does not apply to format '{fmt}'"
                        + (f" (it takes: {', '.join(sorted(allowed))})" if allowed else " (it takes none)"),
                        field=bad[0])


def load_city(source: str | Path, *, fmt: str | None = None, options: dict[str, Any] | None = None,
              data_dir: str | Path | None = None) -> City:
    """Resolve and read a dataset into a validated City (nothing is stored)."""
    return resolve(source, fmt=fmt, options=options, data_dir=data_dir).load()


__all__ = ["FORMATS", "Format", "Resolved", "detect_format", "get_format", "load_city", "resolve"]
