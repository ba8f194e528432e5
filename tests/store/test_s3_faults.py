"""The S3 server stopped and restarted in the middle of a write."""

from __future__ import annotations

import os
import threading
import time

import pytest

from stgray.errors import StoreError
from stgray.store import ArtifactStore
from stgray.store.seaweed import SeaweedS3


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A server of this test's own (the session's must not be restarted)."""
    srv = SeaweedS3(tmp_path / "s3").start()
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    yield srv
    srv.stop()


def test_write_survives_server_restart(own_s3):
    st = ArtifactStore(f"s3://{own_s3.bucket}/faults")
    with st.writer("tokens", {"restart": 1}) as w:
        w.put_bytes("shard-0.bin", b"a" * 100_000)
        own_s3.stop()  # the server goes away mid-artifact ...
        threading.Timer(1.5, own_s3.start).start()  # ... and comes back 1.5 s later
        w.put_bytes("shard-1.bin", b"b" * 100_000)  # retried with backoff until it is back
    aid = st.id_for("tokens", {"restart": 1})
    st.verify(aid)
    assert st.read_bytes(aid, "shard-1.bin") == b"b" * 100_000


def test_server_down_leaves_no_artifact_and_a_later_run_completes(own_s3):
    st = ArtifactStore(f"s3://{own_s3.bucket}/faults2")
    aid = st.id_for("tokens", {"down": 1})
    t0 = time.time()
    with pytest.raises(StoreError, match="unreachable after retries"):
        with st.writer("tokens", {"down": 1}) as w:
            w.put_bytes("shard-0.bin", b"a" * 1000)
            own_s3.stop()
            w.put_bytes("shard-1.bin", b"b" * 1000)
    assert time.time() - t0 < 60  # bounded retries, then one clear error
    own_s3.start()
    st2 = ArtifactStore(st.url)
    assert not st2.exists(aid)  # the crashed write committed nothing readers accept
    with st2.writer("tokens", {"down": 1}) as w:  # the re-run completes it
        w.put_bytes("shard-0.bin", b"a" * 1000)
        w.put_bytes("shard-1.bin", b"b" * 1000)
    st2.verify(aid)


def test_ports_for_weed_come_from_below_the_ephemeral_range():
    from stgray.store.seaweed import free_port

    # outgoing connections (weed's own services, Ray) draw from 32768-60999: a port chosen
    # there can be taken before weed binds it, and weed then exits at start-up
    assert all(20000 <= free_port() <= 32767 for _ in range(20))
