"""Content-addressed, all-or-nothing artifact store over fsspec (local folder or S3).

Layout under the store root::

    <kind>/<key>/MANIFEST.json          written last; its presence is the commit
    <kind>/<key>/<attempt>/<name>       data objects of one write attempt

``key`` is the hash of the stage config and the ids of the input artifacts, so the same
work always lands in the same place and a finished stage is found and skipped. Each
write attempt puts its objects under a fresh ``attempt`` folder and then writes a
manifest that names only its own objects with their sizes and SHA-256 sums; two writers
racing on one key each commit a complete artifact and the last manifest wins, never a
mixture. Readers only see artifacts whose manifest exists, and verify every object they
read against it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import re
import time
import uuid
from typing import IO, Any, Iterator

from pydantic import BaseModel, Field

import stgray
from stgray.config import canonical_json, content_hash
from stgray.errors import IntegrityError, StoreError
from stgray.store.fs import StoreLocation, make_arrow_fs, make_fs, parse_store_url

MANIFEST = "MANIFEST.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*(/[A-Za-z0-9_][A-Za-z0-9_.=-]*)*$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_CHUNK = 8 << 20


class FileEntry(BaseModel):
    path: str  # relative to the artifact folder: "<attempt>/<name>"
    size: int
    sha256: str


class Manifest(BaseModel):
    """What an artifact is, what made it and what it holds."""

    id: str
    kind: str
    key: str
    label: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    stgray_version: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def check_name(name: str, what: str = "object name") -> str:
    """Refuse names that could escape the artifact folder (``..``, absolute, odd chars)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name.split("/"):
        raise StoreError(f"invalid {what} '{name}' (relative, [A-Za-z0-9_.=-] and '/', no '..')",
                         where="store")
    return name


def artifact_key(kind: str, config: Any, inputs: list[str]) -> str:
    return content_hash({"kind": kind, "config": config, "inputs": sorted(inputs)})


class ArtifactStore:
    """Artifacts in one store. Cheap to construct; picklable for Ray workers."""

    def __init__(self, url: str | None = None):
        self.location: StoreLocation = parse_store_url(url)
        self._fs = None

    def __getstate__(self):
        return {"location": self.location}

    def __setstate__(self, state):
        self.location = state["location"]
        self._fs = None

    def __repr__(self) -> str:
        return f"ArtifactStore({self.location.redacted()!r})"

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def fs(self):
        if self._fs is None:
            self._fs = make_fs(self.location)
        return self._fs

    def arrow_fs(self):
        """``(pyarrow filesystem, root)`` for Parquet readers such as Ray Data."""
        return make_arrow_fs(self.location)

    # paths -------------------------------------------------------------------------
    def _dir(self, artifact_id: str) -> str:
        kind, _, key = artifact_id.partition("/")
        if not _KIND_RE.match(kind) or not re.fullmatch(r"[0-9a-f]{8,64}", key):
            raise StoreError(f"malformed artifact id '{artifact_id}' (want kind/hexkey)",
                             where="store")
        return f"{self.location.root}/{kind}/{key}"

    def object_path(self, artifact_id: str, name: str, manifest: Manifest | None = None) -> str:
        """Store-internal path (no scheme) of a committed object."""
        m = manifest or self.manifest(artifact_id)
        if name not in m.files:
            raise StoreError(f"artifact has no object '{name}'", where=artifact_id)
        return f"{self._dir(artifact_id)}/{m.files[name].path}"

    def object_url(self, artifact_id: str, name: str, manifest: Manifest | None = None) -> str:
        return f"{self.location.protocol}://{self.object_path(artifact_id, name, manifest)}"

    # queries -----------------------------------------------------------------------
    def id_for(self, kind: str, config: Any, inputs: list[str] | None = None) -> str:
        if not _KIND_RE.match(kind):
            raise StoreError(f"invalid artifact kind '{kind}'", where="store")
        for i in inputs or []:
            self._dir(i)
        return f"{kind}/{artifact_key(kind, config, list(inputs or []))}"

    def exists(self, artifact_id: str) -> bool:
        return self._call(lambda: self.fs.exists(f"{self._dir(artifact_id)}/{MANIFEST}"),
                          artifact_id)

    def manifest(self, artifact_id: str) -> Manifest:
        path = f"{self._dir(artifact_id)}/{MANIFEST}"
        try:
            raw = self._call(lambda: self.fs.cat_file(path), artifact_id)
        except FileNotFoundError:
            raise StoreError("no such artifact (no manifest)", where=artifact_id) from None
        try:
            m = Manifest.model_validate_json(raw)
        except ValueError:
            raise IntegrityError("manifest is not valid JSON", where=artifact_id) from None
        if m.id != artifact_id:
            raise IntegrityError(f"manifest names '{m.id}'", where=artifact_id)
        return m

    def ls(self, kind: str | None = None) -> list[Manifest]:
        root = self.location.root
        kinds = [kind] if kind else self._listdir(root)
        out: list[Manifest] = []
        for k in kinds:
            if not _KIND_RE.match(k):
                continue
            for key in self._listdir(f"{root}/{k}"):
                try:
                    out.append(self.manifest(f"{k}/{key}"))
                except StoreError:
                    continue  # uncommitted or foreign folder: invisible to readers
        return sorted(out, key=lambda m: m.created)

    def _listdir(self, path: str) -> list[str]:
        try:
            entries = self._call(lambda: self.fs.ls(path, detail=False), path)
        except FileNotFoundError:
            return []
        self.fs.invalidate_cache(path)
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # reading -----------------------------------------------------------------------
    def read_bytes(self, artifact_id: str, name: str, manifest: Manifest | None = None) -> bytes:
        """An object's bytes, verified against the manifest (size and SHA-256)."""
        m = manifest or self.manifest(artifact_id)
        path = self.object_path(artifact_id, name, m)
        try:
            data = self._call(lambda: self.fs.cat_file(path), f"{artifact_id}/{name}")
        except FileNotFoundError:
            raise IntegrityError("object listed in manifest is missing",
                                 where=f"{artifact_id}/{name}") from None
        _verify(data, m.files[name], f"{artifact_id}/{name}")
        return data

    def read_json(self, artifact_id: str, name: str, manifest: Manifest | None = None) -> Any:
        return json.loads(self.read_bytes(artifact_id, name, manifest))

    def verify(self, artifact_id: str, names: list[str] | None = None) -> Manifest:
        """Stream every object (or ``names``) and check size and checksum."""
        m = self.manifest(artifact_id)
        for name in names or list(m.files):
            entry = m.files[name]
            path = self.object_path(artifact_id, name, m)
            h, size = hashlib.sha256(), 0
            try:
                with self.fs.open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                raise IntegrityError("object listed in manifest is missing",
                                     where=f"{artifact_id}/{name}") from None
            if size != entry.size or h.hexdigest() != entry.sha256:
                raise IntegrityError(
                    f"checksum mismatch (size {size} vs {entry.size}); object is corrupt",
                    where=f"{artifact_id}/{name}")
        return m

    # writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, kind: str, config: Any, inputs: list[str] | None = None, *,
               label: str = "", meta: dict[str, Any] | None = None) -> Iterator["ArtifactWriter"]:
        """Write one artifact all-or-nothing; the manifest is written only on success."""
        artifact_id = self.id_for(kind, config, inputs)
        w = ArtifactWriter(self, artifact_id, kind, config, list(inputs or []), label, meta or {})
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        w.commit()

    def delete(self, artifact_id: str) -> None:
        path = self._dir(artifact_id)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{path}/{MANIFEST}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def _call(self, fn, what: str):
        """Run a filesystem call, turning connection/credential failures into one line."""
        last: Exception | None = None
        for attempt in range(_RETRIES):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except PermissionError as e:
                raise StoreError(f"access denied ({_short(e)}); check AWS credentials",
                                 where=self.location.redacted()) from None
            except OSError as e:
                last = e
                if "InvalidAccessKeyId" in str(e) or "SignatureDoesNotMatch" in str(e):
                    raise StoreError("credentials refused by the S3 server (check AWS_ACCESS_KEY_ID"
                                     "/AWS_SECRET_ACCESS_KEY)", where=self.location.redacted()) from None
                if "NoSuchBucket" in str(e):
                    raise StoreError("bucket does not exist", where=self.location.redacted()) from None
                _backoff(attempt)
            except Exception as e:  # botocore endpoint errors are not OSErrors
                last = e
                name = type(e).__name__
                if "Credentials" in name:
                    raise StoreError("no S3 credentials found (set AWS_ACCESS_KEY_ID/"
                                     "AWS_SECRET_ACCESS_KEY or an AWS profile)",
                                     where=self.location.redacted()) from None
                if "Endpoint" not in name and "Connect" not in name:
                    raise
                _backoff(attempt)
        raise StoreError(f"store unreachable after retries ({_short(last)})",
                         where=f"{self.location.redacted()} {what}") from None


_RETRIES = 6  # backoff 0.5, 1, 2, 4, 8 s: rides out a server restart of ~15 s


def _backoff(attempt: int) -> None:
    if attempt < _RETRIES - 1:
        time.sleep(0.5 * 2 ** attempt)


def _short(e: BaseException | None) -> str:
    s = f"{type(e).__name__}: {e}" if e else "unknown error"
    return s.splitlines()[0][:200]


def _verify(data: bytes, entry: FileEntry, where: str) -> None:
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(f"checksum mismatch (size {len(data)} vs {entry.size}); "
                             "object is corrupt", where=where)


class _HashingFile(io.RawIOBase):
    """Write-only file wrapper that counts bytes and hashes them on the way through."""

    def __init__(self, f: IO[bytes]):
        self._f, self.h, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        self._f.write(b)
        self.h.update(b)
        self.size += len(b)
        return len(b)


class ArtifactWriter:
    """Collects the objects of one artifact; created by ``ArtifactStore.writer``."""

    def __init__(self, store: ArtifactStore, artifact_id: str, kind: str, config: Any,
                 inputs: list[str], label: str, meta: dict[str, Any]):
        self.store, self.id, self.kind = store, artifact_id, kind
        self.config, self.inputs, self.label, self.meta = config, inputs, label, dict(meta)
        self.attempt = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.files: dict[str, FileEntry] = {}
        self._dir = store._dir(artifact_id)

    def _path(self, name: str) -> str:
        check_name(name)
        if name in self.files:
            raise StoreError(f"object '{name}' written twice", where=self.id)
        return f"{self._dir}/{self.attempt}/{name}"

    def put_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        self.store._call(lambda: self.store.fs.pipe_file(path, data), f"{self.id}/{name}")
        self.files[name] = FileEntry(path=f"{self.attempt}/{name}", size=len(data),
                                     sha256=hashlib.sha256(data).hexdigest())

    def put_json(self, name: str, obj: Any) -> None:
        self.put_bytes(name, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """Stream an object (e.g. a Parquet writer's sink); hashed as it is written."""
        path = self._path(name)
        with self.store.fs.open(path, "wb") as f:
            hf = _HashingFile(f)
            yield hf
        self.files[name] = FileEntry(path=f"{self.attempt}/{name}", size=hf.size,
                                     sha256=hf.h.hexdigest())

    def commit(self) -> Manifest:
        m = Manifest(id=self.id, kind=self.kind, key=self.id.split("/", 1)[1], label=self.label,
                     config=json.loads(canonical_json(self.config)), inputs=self.inputs,
                     files=self.files, meta=json.loads(canonical_json(self.meta)),
                     created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                     stgray_version=stgray.__version__)
        data = m.model_dump_json(indent=1).encode()
        fs, final = self.store.fs, f"{self._dir}/{MANIFEST}"
        if self.store.location.protocol == "file":
            tmp = f"{self._dir}/.{MANIFEST}.{self.attempt}.tmp"
            fs.pipe_file(tmp, data)
            fs.mv(tmp, final)  # rename: atomic on one filesystem
        else:
            self.store._call(lambda: fs.pipe_file(final, data), self.id)  # one PUT: atomic
        return m

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.store.fs.rm(f"{self._dir}/{self.attempt}", recursive=True)
