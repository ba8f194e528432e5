"""The real cluster flow on one machine: `ray start --head` from the project environment,
SeaweedFS as the store, `ray job submit` of the pipeline job, artifacts checked in S3,
a resubmission that resumes instead of redoing work, everything stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from stgray.store.seaweed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

JOB_PIPELINE = {
    "name": "job-tiny",
    "sources": ["hangzhou_metro"],
    "target": "nyc_bike",
    "prepare": {"target_test_days": 3},
    "stages": ["prepare", "baselines", "report"],
}


@pytest.fixture
def ray_head(s3_server, datasets_dir):
    """A Ray head started like a user would, its nodes carrying store settings in their env."""
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    dash = free_port()
    prefix = f"job-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled",
           "STGRAY_STORE": f"s3://{s3_server.bucket}/{prefix}", "STGRAY_DATA_DIR": str(datasets_dir),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={tmp}",
         f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except Exception:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("ray head did not come up")
    yield address, env, prefix
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _submit(address: str, env: dict, config: Path) -> subprocess.CompletedProcess:
    # the submitting shell has no store credentials: the job must get them from the nodes
    sub_env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "STGRAY_"))}
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
         "python", "-m", "jobs.pipeline", str(config)],
        env=sub_env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_ray_job_submit_pipeline(ray_head, tmp_path, s3_server):
    address, env, prefix = ray_head
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(JOB_PIPELINE))
    r = _submit(address, env, cfg)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in (r.stdout + r.stderr)
    assert "historical average" in r.stdout and "report:" in r.stdout
    assert s3_server.secret_key not in r.stdout + r.stderr  # credentials never printed

    from stgray.store import ArtifactStore

    st = ArtifactStore(f"s3://{s3_server.bucket}/{prefix}")
    kinds = {m.kind for m in st.ls()}
    assert {"city", "prepared", "baselines", "report"} <= kinds
    before = sorted(m.id for m in st.ls())
    rep = [m for m in st.ls("report")][0]
    assert b"## Results" in st.read_bytes(rep.id, "report.md")

    r2 = _submit(address, env, cfg)  # submitted twice: resumes, nothing redone
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-4000:]
    assert "done ->" not in r2.stdout and "already in store, skipped" in r2.stdout
    assert sorted(m.id for m in st.ls()) == before
