"""STGP / transfer-benchmark style arrays: ``dataset.npy`` (T, N[, F]) + ``matrix.npy`` (N, N).

Also a single ``.npz`` series (e.g. PEMS0x ``data`` key). The arrays carry no time axis:
the step must be given (``step``), the start defaults to 1970-01-01.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from stgray.data.city import City
from stgray.data.importers.common import load_npy, load_npz, require_file
from stgray.data.importers.user import assemble, parse_start, parse_step
from stgray.errors import DataError

DEFAULT_START = "1970-01-01 00:00"


def inputs(path: Path, options: dict[str, Any]) -> dict[str, Path]:
    if path.is_dir():
        series = path / "dataset.npy"
        if not series.is_file():
            npz = sorted(path.glob("*.npz"))
            series = npz[0] if len(npz) == 1 else series
    else:
        series = path
    files = {"series": require_file(series, "series file")}
    if not options.get("graph") and not options.get("coords"):
        matrix = series.parent / "matrix.npy"
        if matrix.is_file():
            files["graph"] = matrix
    return files


def load(files: dict[str, Path], *, name: str, options: dict[str, Any],
         origin: dict[str, Any] | None = None, licence: str | None = None) -> City:
    sp = files["series"]
    if sp.suffix.lower() == ".npz":
        a, key = load_npz(sp, options.get("key"), prefer=("data", "arr_0", "x"))
        what = f"npz key '{key}'"
    else:
        a, what = load_npy(sp), "npy"
    if a.ndim not in (2, 3):
        raise DataError(f"expected rank 2 (time, nodes) or 3 (time, nodes, features), got shape {a.shape}",
                        where=str(sp), field="series")
    if a.dtype.kind not in "fiub":
        raise DataError(f"dtype {a.dtype} is not numeric", where=str(sp), field="series")
    step_s = parse_step(options.get("step"), str(sp))
    start = parse_start(options.get("start"), DEFAULT_START, str(sp))
    opts = dict(options)
    if "graph" in files and not opts.get("graph"):
        opts["graph"] = files["graph"]
    n = a.shape[1]
    notes = [f"series: {sp.name} ({what}) {a.shape} {a.dtype}; no timestamps in the file: step "
             f"{step_s}s given, start {start}{' (default)' if options.get('start') is None else ''}",
             "node ids: 0..N-1 (the arrays carry none)"]
    return assemble(name=name, series=a, node_ids=[str(i) for i in range(n)], start=start, step_s=step_s,
                    files=files, options=opts, fmt="npy", notes=notes, where=sp)
