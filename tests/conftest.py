"""Session-wide test harness: one SeaweedFS S3 server, one local Ray, the shared datasets.

Everything here is real: a real S3 server on loopback that checks signatures, a real
local Ray, the real public datasets in ../shared/datasets, and the real CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see stgray/__init__.py


def _datasets_dir() -> Path:
    env = os.environ.get("STGRAY_DATA_DIR")
    return Path(env) if env else (REPO.parent / "shared" / "datasets")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models: threads only add overhead)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    d = _datasets_dir()
    if not d.is_dir():
        pytest.fail(f"shared datasets not found at {d} (set STGRAY_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server for the session; its env is set for this process."""
    from stgray.store.seaweed import SeaweedS3

    srv = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    old = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    yield srv
    srv.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_store(s3_server):
    """An empty S3 store (a fresh prefix in the session's bucket)."""
    from stgray.store import ArtifactStore

    return ArtifactStore(f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def local_store(tmp_path):
    from stgray.store import ArtifactStore

    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """Each test using this runs against both store backends."""
    if request.param == "file":
        return request.getfixturevalue("local_store")
    return request.getfixturevalue("s3_store")


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole suite (3 logical CPUs: see ray-notes on deadlocks).

    Started after the S3 server so that Ray's processes inherit its endpoint and keys
    from the environment, as nodes of a real cluster get theirs."""
    import ray

    if not ray.is_initialized():
        tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        ray.init(num_cpus=3, include_dashboard=False, _temp_dir=str(tmp), log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run the installed ``stgray`` command as a user would; returns CompletedProcess."""
    exe = Path(sys.executable).parent / "stgray"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or REPO, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
