"""The quick-start / leave-one-city-out pipeline: each stage an idempotent function from
store artifacts to store artifacts, so a re-run skips what is done and resumes the rest.

    import -> prepare -> zoo -> tokens -> diffusion -> gpdiff -> stgp -> evaluate -> report
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import Field, field_validator

from stgray.config import StageConfig
from stgray.data.prepare import PrepareConfig
from stgray.errors import ConfigError

ALL_STAGES = ["import", "prepare", "zoo", "tokens", "diffusion", "gpdiff", "stgp", "baselines", "report"]


class PipelineConfig(StageConfig):
    """The whole run. Execution settings (store, data_dir, stages) do not enter hashes."""

    _unhashed: ClassVar[frozenset[str]] = frozenset({"store", "data_dir", "stages", "ray_address"})

    name: str = "quickstart"
    store: str | None = Field(None, description="store URL; default $STGRAY_STORE or ./stgray-store")
    data_dir: str | None = Field(None, description="datasets folder; default $STGRAY_DATA_DIR or ../shared/datasets")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: start a local Ray")
    sources: list[str] = Field(..., min_length=1)
    target: str
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    stages: list[str] = Field(default_factory=lambda: list(ALL_STAGES))
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    max_nodes: int | None = Field(None, gt=0, description="keep only the first N nodes of each city (quick runs)")
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                description="per-stage configs (zoo, tokens, diffusion, stgp, ...)")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in ALL_STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; known: {ALL_STAGES}")
        return v

    @field_validator("target")
    @classmethod
    def _target_not_source(cls, v: str, info) -> str:
        if v in info.data.get("sources", []):
            raise ValueError("the target city must not also be a source")
        return v


@dataclass
class StageLog:
    """What each stage did: artifact ids, skipped or not, seconds."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def run(self, stage: str, what: str, fn: Callable[[], tuple[str, bool]]) -> str:
        t0 = time.perf_counter()
        print(f"[{stage}] {what} ...", flush=True)
        aid, skipped = fn()
        dt = time.perf_counter() - t0
        self.rows.append({"stage": stage, "what": what, "artifact": aid,
                          "status": "skipped (in store)" if skipped else "done", "seconds": round(dt, 1)})
        print(f"[{stage}] {what}: {'skipped, already in store' if skipped else 'done'} "
              f"-> {aid} ({dt:.1f}s)", flush=True)
        return aid


def run_pipeline(cfg: PipelineConfig, config_path: str | None = None) -> dict[str, Any]:
    """Run the selected stages; return the stage log and the results rows."""
    from stgray.data.ingest import import_city
    from stgray.data.prepare import prepare_to_store
    from stgray.store import ArtifactStore

    store = ArtifactStore(cfg.store)
    log = StageLog()
    out: dict[str, Any] = {"store": store.url, "stages": log.rows}
    cities = [*cfg.sources, cfg.target]
    city_ids: dict[str, str] = {}
    if cfg.data_dir:
        os.environ["STGRAY_DATA_DIR"] = str(Path(cfg.data_dir).expanduser().resolve())
    for name in cities:
        city_ids[name] = log.run("import", name, lambda n=name: _import(import_city, store, n))
    prepared: dict[str, str] = {}
    if "prepare" in cfg.stages:
        for name in cities:
            role = "target" if name == cfg.target else "source"
            prepared[name] = log.run("prepare", f"{name} ({role})",
                                     lambda n=name, r=role: prepare_to_store(store, city_ids[n], cfg.prepare, r))
    out["city_ids"], out["prepared"] = city_ids, prepared
    return out


def _import(import_city, store, name: str) -> tuple[str, bool]:
    aid, _city, skipped = import_city(store, name)
    return aid, skipped


def load_pipeline_config(path: str) -> PipelineConfig:
    cfg = PipelineConfig.load(path)
    if not cfg.sources:
        raise ConfigError("no source cities", where=path, field="sources")
    return cfg


def stage_table(rows: list[dict[str, Any]]) -> str:
    from stgray.cli.common import format_table

    return format_table(rows)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
