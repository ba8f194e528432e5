"""Artifact store: content-addressed, all-or-nothing, checksummed (local folder or S3)."""

from stgray.store.artifacts import ArtifactStore, ArtifactWriter, Manifest, check_name
from stgray.store.fs import parse_store_url

__all__ = ["ArtifactStore", "ArtifactWriter", "Manifest", "check_name", "parse_store_url"]
