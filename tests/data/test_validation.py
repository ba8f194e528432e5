"""Bad input -> one DataError line naming the file and the field, before any compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stgray.data.importers import load_city, resolve
from stgray.data.ingest import import_city
from stgray.errors import DataError


def data_error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.fixture
def npy_dir(tmp_path):
    """A valid dataset.npy + matrix.npy pair (8 nodes, 50 steps) to break."""
    rng = np.random.default_rng(0)
    d = tmp_path / "pair"
    d.mkdir()
    np.save(d / "dataset.npy", rng.poisson(4, size=(50, 8)).astype(np.float32))
    np.save(d / "matrix.npy", (rng.random((8, 8)) < 0.3).astype(np.float64))
    return d


def _table(tmp_path: Path, ts, n: int = 4, name: str = "s.csv") -> Path:
    df = pd.DataFrame(np.arange(len(ts) * n, dtype=float).reshape(len(ts), n), columns=[f"n{i}" for i in range(n)])
    df.insert(0, "timestamp", ts)
    p = tmp_path / name
    df.to_csv(p, index=False)
    a = np.zeros((n, n))
    a[0, 1] = a[1, 0] = 1
    np.savetxt(tmp_path / "adj.csv", a, delimiter=",")
    return p


def test_valid_fixture_loads(npy_dir):
    assert load_city(npy_dir, options={"step": "1h"}).series.shape == (50, 8, 1)


@pytest.mark.parametrize("shape,want", [((50,), "rank"), ((5, 8, 1, 1), "rank"), ((1, 8), "empty dimension")])
def test_wrong_rank_or_empty(npy_dir, shape, want):
    np.save(npy_dir / "dataset.npy", np.ones(shape))
    msg = data_error(load_city, npy_dir, options={"step": "1h"})
    assert "dataset.npy" in msg and "series" in msg and want in msg


def test_graph_size_must_match_node_count(npy_dir):
    np.save(npy_dir / "matrix.npy", np.ones((9, 9)))
    msg = data_error(load_city, npy_dir, options={"step": "1h"})
    assert "matrix.npy: graph: graph has 9 nodes but the series has 8" in msg
    np.save(npy_dir / "matrix.npy", np.ones((8, 7)))
    assert "must be square" in data_error(load_city, npy_dir, options={"step": "1h"})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_in_series(npy_dir, bad):
    x = np.load(npy_dir / "dataset.npy")
    x[7, 3] = bad
    np.save(npy_dir / "dataset.npy", x)
    msg = data_error(load_city, npy_dir, options={"step": "1h"})
    assert "dataset.npy: series: 1 NaN/inf values (first at (7, 3" in msg


def test_nan_and_negative_weights_in_graph(npy_dir):
    a = np.load(npy_dir / "matrix.npy")
    a[2, 5] = np.nan
    np.save(npy_dir / "matrix.npy", a)
    assert "matrix.npy: graph: NaN/inf" in data_error(load_city, npy_dir, options={"step": "1h"})
    a[2, 5] = -0.5
    np.save(npy_dir / "matrix.npy", a)
    assert "matrix.npy: graph: 1 negative" in data_error(load_city, npy_dir, options={"step": "1h"})


def test_negative_weight_in_edge_list(tmp_path):
    p = _table(tmp_path, pd.date_range("2024-01-01", periods=10, freq="h"))
    (tmp_path / "e.csv").write_text("source,target,weight\nn0,n1,1.0\nn1,n2,-2\n")
    msg = data_error(load_city, p, options={"graph": tmp_path / "e.csv"})
    assert "e.csv: weight: 1 negative edge weights" in msg


def test_unknown_node_in_edge_list(tmp_path):
    p = _table(tmp_path, pd.date_range("2024-01-01", periods=10, freq="h"))
    (tmp_path / "e.csv").write_text("source,target\nn0,n1\nn1,zz\n")
    assert "e.csv: graph: edge endpoint 'zz' is not a node id" in \
        data_error(load_city, p, options={"graph": tmp_path / "e.csv"})


def test_non_monotonic_and_irregular_timestamps(tmp_path):
    ts = list(pd.date_range("2024-01-01", periods=10, freq="h"))
    ts[4], ts[5] = ts[5], ts[4]
    p = _table(tmp_path, ts)
    msg = data_error(load_city, p, options={"graph": tmp_path / "adj.csv"})
    assert "s.csv: timestamp: timestamps not increasing at row 5" in msg
    ts = list(pd.date_range("2024-01-01", periods=10, freq="h"))
    ts[6] = ts[6] + pd.Timedelta(minutes=20)
    p = _table(tmp_path, ts)
    assert "s.csv: timestamp: irregular step at row 6" in data_error(load_city, p, options={"graph": tmp_path / "adj.csv"})
    ts = list(pd.date_range("2024-01-01", periods=10, freq="h"))
    ts[3] = ts[2]
    p = _table(tmp_path, ts)
    assert "not increasing" in data_error(load_city, p, options={"graph": tmp_path / "adj.csv"})


def test_missing_values_and_columns_in_table(tmp_path):
    p = _table(tmp_path, pd.date_range("2024-01-01", periods=10, freq="h"))
    df = pd.read_csv(p)
    df.loc[3, "n2"] = np.nan
    df.to_csv(p, index=False)
    assert "s.csv: n2: 1 empty/NaN/inf values (first at row 3)" in \
        data_error(load_city, p, options={"graph": tmp_path / "adj.csv"})
    df = df.rename(columns={"timestamp": "when"}).fillna(0)
    df.to_csv(p, index=False)
    assert "s.csv: timestamp: no timestamp column" in data_error(load_city, p, options={"graph": tmp_path / "adj.csv"})
    assert "s.csv: time_column: no column 'zz'" in \
        data_error(load_city, p, options={"graph": tmp_path / "adj.csv", "time_column": "zz"})
    df["n1"] = df["n1"].astype(str).str.replace("5.0", "five")
    df.to_csv(p, index=False)
    msg = data_error(load_city, p, options={"graph": tmp_path / "adj.csv", "time_column": "when"})
    assert "s.csv: n1: non-numeric value 'five'" in msg


def test_unknown_format_and_unknown_options(tmp_path, npy_dir):
    p = tmp_path / "city.xyz"
    p.write_text("1,2,3")
    assert "city.xyz: format: unknown format '.xyz'" in data_error(load_city, p)
    assert "format: unknown format 'excel'" in data_error(load_city, npy_dir, fmt="excel")
    assert "option 'step' does not apply to format 'montevideo'" in \
        data_error(resolve, "montevideo_bus", options={"step": "1h"})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "cannot tell the dataset format" in data_error(load_city, empty)


def test_missing_files(tmp_path, npy_dir):
    assert "no such file, folder or dataset name" in data_error(load_city, tmp_path / "nope.npy")
    (npy_dir / "matrix.npy").unlink()
    assert "graph: no graph" in data_error(load_city, npy_dir, options={"step": "1h"})
    assert "nope.csv: graph file not found" in \
        data_error(load_city, npy_dir, options={"step": "1h", "graph": tmp_path / "nope.csv"})
    assert "is not available locally" in data_error(load_city, "nyc_bike", data_dir=tmp_path)
    assert "x: --data-dir: datasets directory not found" in data_error(load_city, "nyc_bike", data_dir=tmp_path / "x")


def test_missing_file_of_a_named_folder_layout(tmp_path, datasets_dir):
    d = tmp_path / "hz"
    d.mkdir()
    shutil.copy(datasets_dir / "hangzhou_metro" / "inflow_tensor.mat", d)
    shutil.copy(datasets_dir / "hangzhou_metro" / "graph.csv", d)
    assert "outflow_tensor.mat: outflow file not found" in data_error(load_city, d, fmt="hangzhou")


def test_unreadable_files(tmp_path, datasets_dir):
    npz = tmp_path / "x.npz"
    npz.write_bytes(b"PK\x03\x04 this is not a zip")
    assert "x.npz: not a readable .npz archive" in data_error(load_city, npz, options={"step": "1h"})
    npy = tmp_path / "dataset.npy"
    npy.write_bytes(b"\x93NUMPY garbage")
    assert "dataset.npy: not a readable .npy file" in data_error(load_city, npy, options={"step": "1h"})
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "dataset.npy: holds Python objects (pickled); refused" in data_error(load_city, npy, options={"step": "1h"})
    js = tmp_path / "montevideo_bus.json"
    js.write_text('{"nodes": [1, 2')
    assert "montevideo_bus.json: not valid JSON" in data_error(load_city, js)
    h5 = tmp_path / "m.h5"
    h5.write_bytes(b"not hdf5" * 10)
    assert "g.csv: graph file not found" in data_error(load_city, h5, options={"graph": tmp_path / "g.csv"})
    (tmp_path / "g.csv").write_text("0,1\n1,0\n")
    assert "m.h5: not a readable HDF5 file" in data_error(load_city, h5, options={"graph": tmp_path / "g.csv"})
    hz = tmp_path / "hz"
    hz.mkdir()
    for f in ("outflow_tensor.mat", "graph.csv"):
        shutil.copy(datasets_dir / "hangzhou_metro" / f, hz)
    (hz / "inflow_tensor.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    assert "inflow_tensor.mat: not a readable MATLAB file" in data_error(load_city, hz)
    pq = tmp_path / "s.parquet"
    pq.write_bytes(b"PAR1 not really")
    assert "s.parquet: not a readable Parquet file" in data_error(load_city, pq, options={"graph": tmp_path / "g.csv"})
    pkl = tmp_path / "adj_mx.pkl"
    pkl.write_bytes(b"\x80\x02garbage")
    t = _table(tmp_path, pd.date_range("2024-01-01", periods=5, freq="h"))
    assert "adj_mx.pkl: not a readable pickle" in data_error(load_city, t, options={"graph": pkl})


def test_missing_keys_and_columns(tmp_path, datasets_dir):
    npz = tmp_path / "s.npz"
    np.savez(npz, a=np.ones((5, 3)), b=np.ones((5, 3)))
    assert "s.npz: key: several arrays ['a', 'b']; say which one" in data_error(load_city, npz, options={"step": "1h"})
    assert "s.npz: zz: no array 'zz'" in data_error(load_city, npz, options={"step": "1h", "key": "zz"})
    # a JSON without links / a node without y
    good = json.loads((datasets_dir / "montevideo_bus" / "montevideo_bus.json").read_text())
    js = tmp_path / "montevideo_bus.json"
    js.write_text(json.dumps({"nodes": good["nodes"][:3]}))
    assert "montevideo_bus.json: links: missing list 'links'" in data_error(load_city, js)
    nodes = [dict(n) for n in good["nodes"][:3]]
    del nodes[1]["y"]
    js.write_text(json.dumps({"nodes": nodes, "links": []}))
    assert "montevideo_bus.json: nodes[].y: node 1 has no 'y'" in data_error(load_city, js)
    # NYC zones file without its graph_id column
    d = tmp_path / "nyc"
    d.mkdir()
    src = datasets_dir / "nyc_bike_taxi_zones"
    np.savez(d / "201901-202012-NYCbike-inoutflow.npz", arr_0=np.load(src / "201901-202012-NYCbike-inoutflow.npz")["arr_0"][:48])
    shutil.copy(src / "W_adj_matrix.csv", d)
    pd.read_csv(src / "manhattan_zones.csv").drop(columns="graph_id").to_csv(d / "manhattan_zones.csv", index=False)
    assert "manhattan_zones.csv: graph_id: missing column 'graph_id'" in data_error(load_city, d)
    # .mat without the expected variable
    import scipy.io

    hz = tmp_path / "hz"
    hz.mkdir()
    scipy.io.savemat(hz / "inflow_tensor.mat", {"other": np.ones((80, 2, 144))})
    shutil.copy(datasets_dir / "hangzhou_metro" / "outflow_tensor.mat", hz)
    shutil.copy(datasets_dir / "hangzhou_metro" / "graph.csv", hz)
    assert "inflow_tensor.mat: inflow_tensor: no variable 'inflow_tensor'" in data_error(load_city, hz)


def test_hdf5_pickled_columns_are_refused(tmp_path):
    df = pd.DataFrame({"a": ["x", "y", "z"], "b": [1.0, 2.0, 3.0]},
                      index=pd.date_range("2024-01-01", periods=3, freq="h"))
    df.to_hdf(tmp_path / "o.h5", key="df")  # object column: PyTables pickles it
    (tmp_path / "g.csv").write_text("0,1\n1,0\n")
    msg = data_error(load_city, tmp_path / "o.h5", options={"graph": tmp_path / "g.csv"})
    assert "o.h5: df/block" in msg and "not numeric" in msg
    df = pd.DataFrame({"a": [1.0, 2.0]}, index=[0, 1])
    df.to_hdf(tmp_path / "i.h5", key="df")
    assert "i.h5: df/index: index is not a DatetimeIndex" in \
        data_error(load_city, tmp_path / "i.h5", options={"graph": tmp_path / "g.csv"})


def test_bad_step_and_options(npy_dir):
    assert "step: cannot read step 'soon'" in data_error(load_city, npy_dir, options={"step": "soon"})
    assert "aggregation: aggregation must be sum or mean" in \
        data_error(load_city, npy_dir, options={"step": "1h", "aggregation": "max"})
    assert "feature: 2 features given for 1 features" in \
        data_error(load_city, npy_dir, options={"step": "1h", "feature": "a,b"})


def test_failed_import_leaves_the_store_empty(npy_dir, local_store):
    np.save(npy_dir / "matrix.npy", np.ones((3, 3)))
    data_error(import_city, local_store, npy_dir, options={"step": "1h"})
    assert local_store.ls() == []
