"""Filesystems behind the store: local folders and S3 (s3fs / pyarrow), credentials from
the environment only.

Store URLs: ``file:///abs/path``, a plain path (``./stgray-store``), or
``s3://bucket/prefix``. For S3-compatible servers the endpoint comes from
``STGRAY_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``; keys from the standard AWS variables or
AWS config files (never from the command line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec

from stgray.errors import StoreError

DEFAULT_STORE = "./stgray-store"


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: ``protocol`` is ``file`` or ``s3``; ``root`` has no scheme."""

    protocol: str
    root: str
    endpoint_url: str | None = None

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.root}"

    def redacted(self) -> str:
        return self.url


def parse_store_url(url: str | None) -> StoreLocation:
    url = url or os.environ.get("STGRAY_STORE") or DEFAULT_STORE
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc:
            path = parsed.netloc + parsed.path
        return StoreLocation("file", str(Path(path).expanduser().resolve()))
    if parsed.scheme in ("s3", "s3a"):
        if parsed.username or parsed.password:
            raise StoreError("credentials must not be part of the store URL; use AWS_* variables",
                             where="store")
        if not parsed.netloc:
            raise StoreError(f"no bucket in '{url}'", where="store")
        root = (parsed.netloc + "/" + parsed.path.strip("/")).rstrip("/")
        endpoint = os.environ.get("STGRAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return StoreLocation("s3", root, endpoint)
    raise StoreError(f"unsupported scheme '{parsed.scheme}' (use a path, file:// or s3://)",
                     where="store")


def make_fs(loc: StoreLocation) -> fsspec.AbstractFileSystem:
    if loc.protocol == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    # Few retries down here: ArtifactStore._call retries whole operations with backoff
    # (about 30 s in all), which is what rides out a restarting server.
    kwargs: dict = {
        "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                          "connect_timeout": 3, "read_timeout": 60},
        "skip_instance_cache": True,
    }
    if loc.endpoint_url:
        kwargs["endpoint_url"] = loc.endpoint_url
    fs = fsspec.filesystem("s3", **kwargs)
    fs.retries = 2  # s3fs's own retry loop (class default 5)
    return fs


def make_arrow_fs(loc: StoreLocation):
    """A ``pyarrow.fs.FileSystem`` for the store, and the root path it expects.

    Ray Data and pyarrow read Parquet through this (pyarrow's native S3 client is faster
    than going through fsspec).
    """
    import pyarrow.fs as pafs

    if loc.protocol == "file":
        return pafs.LocalFileSystem(), loc.root
    kw: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8)}
    if loc.endpoint_url:
        p = urlparse(loc.endpoint_url)
        kw["endpoint_override"] = p.netloc or p.path
        kw["scheme"] = p.scheme or "http"
        kw["region"] = os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return pafs.S3FileSystem(**kw), loc.root
