"""The artifact store on both backends: round trip, lineage, all-or-nothing, integrity."""

from __future__ import annotations

import pytest

from stgray.errors import IntegrityError, StoreError
from stgray.store import ArtifactStore


def test_round_trip_and_lineage(store):
    with store.writer("city", {"x": 1}, label="a") as w:
        w.put_bytes("series.bin", b"abc" * 1000)
        with w.open("nested/obj.bin") as f:
            f.write(b"\x00" * 5000)
    a = store.id_for("city", {"x": 1})
    with store.writer("zoo", {"y": 2}, [a], label="b") as w:
        w.put_json("meta.json", {"k": [1, 2]})
    b = store.id_for("zoo", {"y": 2}, [a])
    assert store.exists(a) and store.exists(b)
    assert store.read_bytes(a, "series.bin") == b"abc" * 1000
    assert store.read_bytes(a, "nested/obj.bin") == b"\x00" * 5000
    assert store.read_json(b, "meta.json") == {"k": [1, 2]}
    assert store.manifest(b).inputs == [a]
    assert {m.id for m in store.ls()} == {a, b}
    assert [m.id for m in store.ls("zoo")] == [b]
    store.verify(a)


def test_id_is_content_addressed(store):
    assert store.id_for("city", {"x": 1}) == store.id_for("city", {"x": 1})
    assert store.id_for("city", {"x": 1}) != store.id_for("city", {"x": 2})
    assert store.id_for("zoo", {}, ["city/0123456789abcdef"]) != store.id_for("zoo", {})


def test_failed_write_leaves_nothing_visible(store):
    with pytest.raises(RuntimeError):
        with store.writer("city", {"crash": True}) as w:
            w.put_bytes("a.bin", b"partial")
            raise RuntimeError("writer crashed")
    aid = store.id_for("city", {"crash": True})
    assert not store.exists(aid)
    assert store.ls() == []
    with pytest.raises(StoreError, match="no such artifact"):
        store.manifest(aid)


def test_tampered_object_is_refused(store):
    with store.writer("tokens", {"t": 1}) as w:
        w.put_bytes("shard-0.parquet", b"0123456789" * 100)
    aid = store.id_for("tokens", {"t": 1})
    path = store.object_path(aid, "shard-0.parquet")
    store.fs.pipe_file(path, b"0123456789" * 99 + b"012345678X")  # same size, one byte changed
    with pytest.raises(IntegrityError, match="shard-0.parquet.*checksum mismatch"):
        store.read_bytes(aid, "shard-0.parquet")
    with pytest.raises(IntegrityError):
        store.verify(aid)
    store.fs.pipe_file(path, b"0123")  # truncated
    with pytest.raises(IntegrityError, match="size 4 vs 1000"):
        store.read_bytes(aid, "shard-0.parquet")


def test_concurrent_writers_commit_one_whole_artifact(store):
    """Two writers of one key: the manifest names one attempt's objects, all of them valid."""
    w1 = store.writer("city", {"same": 1})
    w2 = store.writer("city", {"same": 1})
    a = w1.__enter__()
    b = w2.__enter__()
    a.put_bytes("x.bin", b"from-a" * 10)
    b.put_bytes("x.bin", b"from-b" * 10)
    a.put_bytes("y.bin", b"A")
    b.put_bytes("y.bin", b"B")
    w2.__exit__(None, None, None)
    w1.__exit__(None, None, None)
    aid = store.id_for("city", {"same": 1})
    m = store.verify(aid)
    x, y = store.read_bytes(aid, "x.bin"), store.read_bytes(aid, "y.bin")
    assert (x, y) in [(b"from-a" * 10, b"A"), (b"from-b" * 10, b"B")]
    assert len({e.path.split("/")[0] for e in m.files.values()}) == 1


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a/../../b", "", "a//b", "sp ace"])
def test_names_that_escape_are_refused(store, name):
    with pytest.raises(StoreError, match="invalid object name"):
        with store.writer("city", {"n": name}) as w:
            w.put_bytes(name, b"x")
    assert store.ls() == []


def test_malformed_ids_are_refused(local_store):
    for bad in ["../city/abc", "city/../../etc", "City/0123456789abcdef", "city"]:
        with pytest.raises(StoreError, match="malformed artifact id"):
            local_store.manifest(bad)


def test_wrong_credentials_one_line(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    st = ArtifactStore(f"s3://{s3_server.bucket}/creds")
    with pytest.raises(StoreError) as e:
        st.exists(st.id_for("city", {}))
    assert "\n" not in str(e.value) and ("denied" in str(e.value) or "refused" in str(e.value))


def test_credentials_in_url_refused():
    with pytest.raises(StoreError, match="credentials must not be part"):
        ArtifactStore("s3://key:secret@bucket/prefix")
