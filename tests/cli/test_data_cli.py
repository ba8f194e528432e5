"""``stgray data`` through the installed command: imports into S3, errors as one line."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd

from stgray.data.city import read_city
from stgray.data.importers import load_city
from stgray.store import ArtifactStore

SHARED = ["nyc_bike", "nyc_taxi", "hangzhou_metro", "montevideo_bus", "los_loop"]


def _ids(stdout: str) -> dict[str, str]:
    """name -> artifact id from the import summary table."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("city/"):
            out[cells[2]] = cells[0]
    return out


def test_import_all_into_s3_and_back(cli, s3_server, datasets_dir):
    url = f"s3://{s3_server.bucket}/cli-{uuid.uuid4().hex[:8]}"
    env = {"STGRAY_DATA_DIR": str(datasets_dir)}
    r = cli("data", "import", "all", "--store", url, env=env)
    assert r.returncode == 0, r.stderr
    ids = _ids(r.stdout)
    assert list(ids) == SHARED and r.stdout.count("| imported ") == 5
    st = ArtifactStore(url)
    for name, aid in ids.items():
        want = load_city(name, data_dir=datasets_dir)
        got = read_city(st, aid)
        np.testing.assert_array_equal(got.series, want.series)
        np.testing.assert_array_equal(got.edges, want.edges)
        np.testing.assert_array_equal(got.weights, want.weights)
        assert got.node_ids == want.node_ids and got.start == want.start and got.step_s == want.step_s
        assert (got.coords is None) == (want.coords is None)
    # again: found by the files' checksums, nothing re-imported
    r2 = cli("data", "import", "all", "--store", url, env=env)
    assert r2.returncode == 0 and r2.stdout.count("skipped (in store)") == 5 and _ids(r2.stdout) == ids
    r3 = cli("data", "show", ids["hangzhou_metro"], "--store", url)
    assert r3.returncode == 0, r3.stderr
    assert "station 54 was dropped" in r3.stdout and "xinychen/transdim@1abfed2" in r3.stdout
    assert "| 3600 " in r3.stdout and "licence: MIT" in r3.stdout


def _assert_one_line_error(r, *needles: str) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_fail_cleanly_and_store_stays_empty(cli, tmp_path, s3_server):
    store = str(tmp_path / "store")
    d = tmp_path / "pair"
    d.mkdir()
    np.save(d / "dataset.npy", np.ones((20, 4)))
    np.save(d / "matrix.npy", np.ones((5, 5)))
    _assert_one_line_error(cli("data", "import", str(d), "--step", "1h", "--store", store),
                           "matrix.npy: graph: graph has 5 nodes but the series has 4")
    x = np.ones((20, 4))
    x[3, 2] = np.nan
    np.save(d / "dataset.npy", x)
    np.save(d / "matrix.npy", np.eye(4))
    _assert_one_line_error(cli("data", "import", str(d), "--step", "1h", "--store", store),
                           "dataset.npy: series: 1 NaN/inf values")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04broken")
    _assert_one_line_error(cli("data", "import", str(bad), "--step", "1h", "--graph", str(d / "matrix.npy"),
                               "--store", store), "bad.npz: not a readable .npz archive")
    _assert_one_line_error(cli("data", "import", str(tmp_path / "missing.csv"), "--store", store),
                           "missing.csv: no such file")
    (tmp_path / "c.xlsx").write_bytes(b"x")
    _assert_one_line_error(cli("data", "import", str(tmp_path / "c.xlsx"), "--store", store),
                           "unknown format '.xlsx'")
    ts = pd.date_range("2024-01-01", periods=6, freq="h").tolist()
    ts[2], ts[3] = ts[3], ts[2]
    pd.DataFrame({"timestamp": ts, "a": range(6), "b": range(6)}).to_csv(tmp_path / "s.csv", index=False)
    _assert_one_line_error(cli("data", "import", str(tmp_path / "s.csv"), "--coords", str(tmp_path / "xy.csv"),
                               "--store", store), "xy.csv: coordinates file not found")
    (tmp_path / "xy.csv").write_text("node_id,lat,lon\na,40,-74\nb,40.1,-74\n")
    _assert_one_line_error(cli("data", "import", str(tmp_path / "s.csv"), "--coords", str(tmp_path / "xy.csv"),
                               "--store", store), "s.csv: timestamp: timestamps not increasing")
    assert ArtifactStore(store).ls() == []
    # the same through the S3 store
    url = f"s3://{s3_server.bucket}/bad-{uuid.uuid4().hex[:8]}"
    _assert_one_line_error(cli("data", "import", str(d), "--step", "1h", "--store", url), "NaN/inf")
    assert ArtifactStore(url).ls() == []


def test_offline_download_and_missing_dataset_say_what_to_do(cli, tmp_path):
    empty = tmp_path / "datasets"
    empty.mkdir()
    msg = _assert_one_line_error(cli("data", "import", "montevideo_bus", "--data-dir", str(empty),
                                     "--store", str(tmp_path / "s")), "not available locally")
    assert "--download" in msg
    proxy = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    _assert_one_line_error(cli("data", "import", "montevideo_bus", "--download", "--data-dir", str(empty),
                               "--store", str(tmp_path / "s"), env=proxy),
                           "raw.githubusercontent.com/benedekrozemberczki/pytorch_geometric_temporal/adefe442",
                           "cannot download")
    assert not (tmp_path / "s").exists() or ArtifactStore(str(tmp_path / "s")).ls() == []


def test_list_formats_and_help(cli, datasets_dir):
    r = cli("data", "list", env={"STGRAY_DATA_DIR": str(datasets_dir)})
    assert r.returncode == 0 and all(n in r.stdout for n in SHARED) and r.stdout.count("| yes ") == 5
    assert "Evens1sen/Deep-NYC-Taxi-Bike@097aa2d8" in r.stdout
    r = cli("data", "formats")
    assert r.returncode == 0 and "hdf5" in r.stdout and "dataset.npy" in r.stdout
    for sub, needle in [("import", "adj_mx.pkl"), ("list", "locally"), ("show", "provenance"),
                        ("formats", "formats")]:
        h = cli("data", sub, "--help")
        assert h.returncode == 0 and needle in h.stdout, (sub, h.stdout)
    assert "--download" in cli("data", "import", "--help").stdout


def test_user_hdf5_with_dcrnn_graph_via_cli(cli, tmp_path, datasets_dir):
    g = datasets_dir / "metrla_pemsbay_graphs"
    ids = (g / "graph_sensor_ids.txt").read_text().strip().split(",")
    v = np.random.default_rng(0).uniform(10, 70, size=(96, len(ids)))
    pd.DataFrame(v, index=pd.date_range("2012-03-01", periods=96, freq="5min"), columns=ids) \
        .to_hdf(tmp_path / "metr-la.h5", key="df")
    store = str(tmp_path / "store")
    r = cli("data", "import", str(tmp_path / "metr-la.h5"), "--graph", str(g / "adj_mx.pkl"),
            "--coords", str(g / "graph_sensor_locations.csv"), "--store", store)
    assert r.returncode == 0, r.stderr
    aid = _ids(r.stdout)["metr-la"]
    c = read_city(ArtifactStore(store), aid)
    np.testing.assert_array_equal(c.series[:, :, 0], v.astype(np.float32))
    assert c.step_s == 300 and c.coords is not None and len(c.edges) == 1515
    assert "restricted unpickler" in c.provenance["graph"]["source"]
    # a malicious pickle as the graph is refused, nothing stored
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    _assert_one_line_error(cli("data", "import", str(tmp_path / "metr-la.h5"), "--graph",
                               str(tmp_path / "evil.pkl"), "--store", str(tmp_path / "store2")),
                           "evil.pkl", "os.system", "not allowed")
    assert ArtifactStore(str(tmp_path / "store2")).ls() == []
