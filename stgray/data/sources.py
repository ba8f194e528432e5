"""The named public city datasets: where they come from, where they are, how to fetch them.

Each dataset lists its raw files with the public repository, commit and path they were
published at (../shared/datasets/SOURCES.md) and the SHA-256 of the published bytes, so
a local copy or a download is checked before it is used.

Datasets directory, first found: an explicit argument, ``$STGRAY_DATA_DIR``,
``../shared/datasets`` next to the repository root or the current directory, and
``~/.cache/stgray/datasets`` (where ``download`` puts files by default).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stgray.errors import DataError

RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
CACHE_DIR = Path("~/.cache/stgray/datasets")


@dataclass(frozen=True)
class SourceFile:
    """One raw file of a dataset, as published."""

    role: str  # how the importer refers to it (series, graph, zones, ...)
    folder: str  # sub-folder of the datasets directory
    name: str
    repo: str
    commit: str
    path: str  # path inside the repository
    sha256: str
    required: bool = True

    @property
    def url(self) -> str:
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=self.path)

    def origin(self) -> dict[str, str]:
        return {"repository": f"https://github.com/{self.repo}", "commit": self.commit,
                "path": self.path, "url": self.url, "sha256": self.sha256}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    fmt: str  # importer key in stgray.data.importers.FORMATS
    licence: str
    files: tuple[SourceFile, ...]
    options: dict[str, Any] = field(default_factory=dict)
    shape: str = ""
    step: str = ""

    @property
    def folder(self) -> str:
        return self.files[0].folder

    @property
    def origin(self) -> str:
        f = self.files[0]
        return f"{f.repo}@{f.commit}"

    def origin_record(self) -> dict[str, Any]:
        return {"kind": "public dataset", "dataset": self.name,
                "files": {f.name: f.origin() for f in self.files}}


_NYC = ("Evens1sen/Deep-NYC-Taxi-Bike", "097aa2d8")
_HZ = "xinychen/transdim"
_HZ_DIR = "datasets/Hangzhou-data-set"
_TGCN = ("lehaifeng/T-GCN", "219a2346")
_DCRNN = ("liyaguang/DCRNN", "602afd9d")
_PGT = ("benedekrozemberczki/pytorch_geometric_temporal", "adefe442")


def _nyc_files(kind: str, sha: str) -> tuple[SourceFile, ...]:
    series = f"201901-202012-NYC{kind}-inoutflow.npz"
    sub = "data-NYCBike" if kind == "bike" else "data-NYCTaxi"
    return (
        SourceFile("series", "nyc_bike_taxi_zones", series, *_NYC, f"{sub}/60min/{series}", sha),
        SourceFile("graph", "nyc_bike_taxi_zones", "W_adj_matrix.csv", *_NYC,
                   "data-NYCZones/adjmatrix/W_adj_matrix.csv",
                   "1822444cccf3545b6d2b410c0f36071f495a5f5ba6e65020f15f07359a60f9a9"),
        SourceFile("zones", "nyc_bike_taxi_zones", "manhattan_zones.csv", *_NYC,
                   "data-NYCZones/zones/manhattan_zones.csv",
                   "8b06eb185812d95c19a84951861b9a40a16672b522694238ff364cd369e850ec"),
    )


DATASETS: dict[str, DatasetSpec] = {d.name: d for d in [
    DatasetSpec(
        "nyc_bike", "Citi Bike in/out flow, 69 Manhattan taxi zones, 2019-2020", "nyc",
        "none stated (NYC open data)",
        _nyc_files("bike", "e6be89d9dd41579ecd0551699ff85490149993c50595425872b8d2ba35246b72"),
        options={"mode": "bike"}, shape="17544x69x2", step="1h"),
    DatasetSpec(
        "nyc_taxi", "Yellow-taxi in/out flow, 69 Manhattan taxi zones, 2019-2020", "nyc",
        "none stated (NYC open data)",
        _nyc_files("taxi", "9d0734122f8e168e2f7f690ab4a857542c29fd9c888f27fe09fb48890b3f15f5"),
        options={"mode": "taxi"}, shape="17544x69x2", step="1h"),
    DatasetSpec(
        "hangzhou_metro", "Hangzhou metro station in/out flow, 80 stations, 2019-01-01..25",
        "hangzhou", "MIT",
        (SourceFile("inflow", "hangzhou_metro", "inflow_tensor.mat", _HZ, "1abfed2",
                    f"{_HZ_DIR}/inflow_tensor.mat",
                    "ceca068765ae16208346bf12ee0c76f94d1bbb25288950ccfd0a10debd8b6391"),
         SourceFile("outflow", "hangzhou_metro", "outflow_tensor.mat", _HZ, "cf0e230",
                    f"{_HZ_DIR}/outflow_tensor.mat",
                    "485ae2c0fc17807994bb48565eb519797be0f6d45c31d3469acf27ff22505d8c"),
         SourceFile("graph", "hangzhou_metro", "graph.csv", _HZ, "99a31275", f"{_HZ_DIR}/graph.csv",
                    "d2e3d362551d6fbf3cc6930f2fa9520e91fa0a2ae90b9a2b010eb42b0b128a09")),
        shape="3600x80x2", step="10min"),
    DatasetSpec(
        "montevideo_bus", "Hourly passenger inflow at 675 Montevideo bus stops, October 2020",
        "montevideo", "MIT",
        (SourceFile("series", "montevideo_bus", "montevideo_bus.json", *_PGT,
                    "dataset/montevideo_bus.json",
                    "37d9c6286d474077b5c05173c1570c4da42c387013116daa8862c7a6cab86a75"),),
        shape="744x675x1", step="1h"),
    DatasetSpec(
        "los_loop", "Loop-detector speed, 207 Los Angeles sensors (one week of METR-LA), March 2012",
        "los", "none stated",
        (SourceFile("series", "los_loop", "los_speed.csv", *_TGCN, "data/los_speed.csv",
                    "7b732d86ae32b2930595becba28aff39dacbfb2197e250fc0332e1744ce2cbf4"),
         SourceFile("graph", "los_loop", "los_adj.csv", *_TGCN, "data/los_adj.csv",
                    "7a6eb41e10677992b5af50f5ab187c6c05c5c3a92cb973950cfddbf857361e76"),
         SourceFile("coords", "metrla_pemsbay_graphs", "graph_sensor_locations.csv", *_DCRNN,
                    "data/sensor_graph/graph_sensor_locations.csv",
                    "eb8ea96e07358b45d0e4ba3b89c2673fa20c54af50150249e627389e749ade6f",
                    required=False)),
        shape="2016x207x1", step="5min"),
]}

# Graph-only files that pair with user-supplied METR-LA / PEMS-BAY HDF5 series.
EXTRA_FILES: tuple[SourceFile, ...] = (
    SourceFile("graph", "metrla_pemsbay_graphs", "adj_mx.pkl", *_DCRNN, "data/sensor_graph/adj_mx.pkl",
               "a35687c6e15aa228dc45027b0ed2a0ea0f4ec78f573deb992c595092d12f61b3"),
    SourceFile("graph", "metrla_pemsbay_graphs", "adj_mx_bay.pkl", *_DCRNN,
               "data/sensor_graph/adj_mx_bay.pkl",
               "116275f5704d0d492018e14c047f7ae5004385b450aa907f88424055a4a97370"),
)


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)}; or give a path)",
                        field="dataset")
    return DATASETS[name]


# --- locations -----------------------------------------------------------------------

def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def candidate_dirs() -> list[Path]:
    out = [repo_root().parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets",
           Path.cwd() / "shared" / "datasets", CACHE_DIR.expanduser()]
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def resolve_data_dir(explicit: str | Path | None = None, *, must_exist: bool = False) -> Path | None:
    """The datasets directory (see module doc); None when none is found."""
    for given, what in ((explicit, "--data-dir"), (os.environ.get("STGRAY_DATA_DIR") or None, "STGRAY_DATA_DIR")):
        if given:
            p = Path(given).expanduser()
            if not p.is_dir():
                raise DataError("datasets directory not found", where=str(p), field=what)
            return p
    for p in candidate_dirs():
        if p.is_dir():
            return p
    if must_exist:
        raise DataError("no datasets directory found (tried " +
                        ", ".join(str(p) for p in candidate_dirs()) +
                        "); set STGRAY_DATA_DIR or pass --data-dir", field="data_dir")
    return None


def local_files(name: str, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Role -> local path of a named dataset's files; a DataError says how to get missing ones."""
    spec = get_spec(name)
    base = resolve_data_dir(data_dir)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for f in spec.files:
        p = base / f.folder / f.name if base is not None else None
        if p is not None and p.is_file():
            found[f.role] = p
        elif f.required:
            missing.append(f"{f.folder}/{f.name}")
    if missing:
        where = str(base) if base is not None else "no datasets directory"
        raise DataError(f"dataset '{name}' is not available locally (missing {', '.join(missing)}); "
                        f"fetch it with 'stgray data import {name} --download' or point "
                        "STGRAY_DATA_DIR/--data-dir at a copy", where=where)
    return found


def is_local(name: str, data_dir: str | Path | None = None) -> bool:
    try:
        local_files(name, data_dir)
    except DataError:
        return False
    return True


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- download ------------------------------------------------------------------------

def default_download_dir(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("STGRAY_DATA_DIR")
    return Path(env).expanduser() if env else CACHE_DIR.expanduser()


def download(name: str, dest: str | Path | None = None, *, timeout: float = 60.0) -> Path:
    """Fetch a named dataset's raw files over HTTPS into ``dest/<folder>/``; returns ``dest``.

    Files already present with the published checksum are kept; each download is checked
    against the published SHA-256 before it is moved into place.
    """
    spec = get_spec(name)
    root = default_download_dir(dest)
    for f in spec.files:
        target = root / f.folder / f.name
        if target.is_file() and sha256_of(target) == f.sha256:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{f.name}.part")
        h = hashlib.sha256()
        try:
            req = urllib.request.Request(f.url, headers={"User-Agent": "stgray"})
            with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as out:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as e:
            tmp.unlink(missing_ok=True)
            if not f.required:
                continue
            raise DataError(f"download failed: HTTP {e.code} {e.reason}", where=f.url) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            if not f.required:
                continue
            reason = getattr(e, "reason", e)
            raise DataError(f"cannot download (offline? {str(reason)[:120]}); copy the files into "
                            f"{root / f.folder} by hand", where=f.url) from None
        if h.hexdigest() != f.sha256:
            tmp.unlink(missing_ok=True)
            raise DataError(f"downloaded file has SHA-256 {h.hexdigest()[:16]}..., published "
                            f"{f.sha256[:16]}...; not used", where=f.url)
        os.replace(tmp, target)
    return root
