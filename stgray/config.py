"""Typed, serialisable stage configs whose hash names the artifacts they produce.

Every stage has one ``StageConfig`` subclass. ``config_hash()`` covers the fields that
change what a stage computes; fields listed in ``_unhashed`` (worker counts, devices,
progress settings) only change how it runs, so a 1-node and a 4-node run of the same
config name the same artifact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from stgray.errors import ConfigError

T = TypeVar("T", bound="StageConfig")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every hash in stgray."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the SHA-256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


class StageConfig(BaseModel):
    """Base of all stage configs: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    _unhashed: ClassVar[frozenset[str]] = frozenset()
    # fields added after artefacts existed: left out of the hash while they hold this
    # value (their old behaviour), so those artefacts keep their names
    _hashed_unless: ClassVar[dict[str, Any]] = {}

    def hashed_dict(self) -> dict[str, Any]:
        """The fields that define the stage's result (execution-only fields removed)."""
        d = self.model_dump(mode="json")
        return _drop_unhashed(self, d)

    def config_hash(self) -> str:
        return content_hash({"type": type(self).__name__, "config": self.hashed_dict()})

    @classmethod
    def from_mapping(cls: type[T], data: Any, where: str = "config") -> T:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_first_error(e), where=where) from None

    @classmethod
    def load(cls: type[T], path: str | Path, section: str | None = None) -> T:
        """Read a YAML/JSON file (optionally one top-level section of it)."""
        data = read_config_file(path)
        if section is not None:
            if not isinstance(data, dict) or section not in data:
                raise ConfigError(f"missing section '{section}'", where=str(path))
            data = data[section]
        return cls.from_mapping(data, where=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _drop_unhashed(model: BaseModel, d: dict[str, Any]) -> dict[str, Any]:
    skip = getattr(type(model), "_unhashed", frozenset())
    unless = getattr(type(model), "_hashed_unless", {})
    out = {}
    for name, value in d.items():
        if name in skip or (name in unless and value == unless[name]):
            continue
        sub = getattr(model, name, None)
        if isinstance(sub, BaseModel) and isinstance(value, dict):
            value = _drop_unhashed(sub, value)
        out[name] = value
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{loc}: {msg}{extra}"


def read_config_file(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", where=str(path))
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", where=str(path)) from None
    try:
        if p.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise ConfigError(f"not valid YAML/JSON ({type(e).__name__})", where=where) from None
