"""The bad-input matrix through the real CLI: one line on stderr, non-zero exit, no
traceback, nothing written to the store."""

from __future__ import annotations

import numpy as np
import pytest

from stgray.store.seaweed import free_port


def _one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["store", "show", "../../etc/passwd"], ["malformed artifact id"]),
    (["store", "show", "city/../../x"], ["malformed artifact id"]),
    (["store", "show", "city/0123456789abcdef"], ["no such artifact"]),
    (["data", "import", "/nonexistent/file.csv"], ["/nonexistent/file.csv", "no such file"]),
    (["run", "/nonexistent.yaml"], ["config file not found"]),
])
def test_bad_arguments(cli, tmp_path, args, needles):
    store = tmp_path / "store"
    _one_line_error(cli(*args, "--store", str(store)), *needles)
    assert not store.exists() or not any(store.rglob("MANIFEST.json"))


def test_oversized_input_refused(cli, tmp_path):
    big = tmp_path / "dataset.npy"
    np.save(big, np.zeros((2, 60_000), np.float32))
    np.save(tmp_path / "matrix.npy", np.zeros((1, 1), np.float32))
    store = tmp_path / "store"
    r = cli("data", "import", str(big), "--graph", str(tmp_path / "matrix.npy"), "--step", "5min",
            "--store", str(store))
    _one_line_error(r, "dataset.npy")
    assert not store.exists() or not any(store.rglob("MANIFEST.json"))


def test_wrong_s3_credentials_and_endpoint(cli, s3_server):
    bucket = s3_server.bucket
    r = cli("data", "import", "los_loop", "--store", f"s3://{bucket}/creds",
            env={"AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    _one_line_error(r)
    assert "wrong-secret" not in r.stderr and "credentials" in r.stderr or "denied" in r.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    r = cli("store", "ls", "--store", f"s3://{bucket}/x",
            env={"STGRAY_S3_ENDPOINT": dead, "AWS_ENDPOINT_URL": dead})
    _one_line_error(r, "unreachable")
    r = cli("store", "ls", "--store", "s3://user:pw@bucket/x")
    _one_line_error(r, "credentials must not be part of the store URL")
    # nothing was written under the prefix the failed import aimed at
    from stgray.store import ArtifactStore

    assert ArtifactStore(f"s3://{bucket}/creds").ls() == []
