"""The pipeline: each stage an idempotent function from store artifacts to store artifacts,
so a re-run skips what is done and resumes the rest.

    import -> prepare -> [gpdiff: zoo -> tokens -> diffusion -> gpdiff (transfer)]
                      -> [stgp: pretrain -> domain prompt -> task prompts]
                      -> baselines -> report
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator

from stgray.config import StageConfig
from stgray.data.prepare import PrepareConfig
from stgray.engines.gpdiff_transfer import TransferConfig
from stgray.engines.stgp import STGPPretrainConfig, STGPPromptConfig
from stgray.engines.tokens import TokensConfig
from stgray.engines.zoo import ZooConfig
from stgray.gpdiff.diffusion import DiffusionConfig

ALL_STAGES = ["prepare", "zoo", "tokens", "diffusion", "gpdiff", "stgp", "baselines", "report"]
STGP_TASKS = ("forecast", "kriging", "extrapolation")
REPORT_KIND, BASELINE_KIND = "report", "baselines"


class PipelineConfig(StageConfig):
    """The whole run. Execution settings (store, data_dir, stages, ray) enter no hash."""

    _unhashed: ClassVar[frozenset[str]] = frozenset({"store", "data_dir", "stages", "ray_address",
                                                     "diffusion_workers"})
    _hashed_unless: ClassVar[dict[str, Any]] = {"stgp_deseasonalise_tasks": None}

    name: str = "quickstart"
    store: str | None = Field(None, description="store URL; default $STGRAY_STORE or ./stgray-store")
    data_dir: str | None = Field(None, description="datasets folder; default $STGRAY_DATA_DIR or ../shared/datasets")
    ray_address: str | None = Field(None, description="Ray cluster to join; default $RAY_ADDRESS or a local Ray")
    sources: list[str] = Field(..., min_length=1)
    target: str
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    stages: list[str] = Field(default_factory=lambda: list(ALL_STAGES))
    tasks: list[str] = Field(default_factory=lambda: list(STGP_TASKS))
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    zoo: ZooConfig = Field(default_factory=ZooConfig)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    diffusion_workers: int = Field(1, gt=0)
    gpdiff: TransferConfig = Field(default_factory=TransferConfig)
    stgp_pretrain: STGPPretrainConfig = Field(default_factory=STGPPretrainConfig)
    stgp_prompt: STGPPromptConfig = Field(default_factory=STGPPromptConfig)
    stgp_variants: list[str] = Field(default_factory=lambda: ["two_stage", "one_stage", "finetune"],
                                     description="two_stage (domain+task prompts), one_stage (task "
                                                 "prompts only), finetune (all weights, no prompts)")
    stgp_deseasonalise_tasks: list[str] | None = Field(
        None, description="tasks whose STGP stages (from pre-training on) use deseasonalised data; "
                          "the others use a pre-training on the data as is. None: "
                          "stgp_pretrain.deseasonalise for every task")

    def stgp_pretrain_for(self, task: str, seed: int) -> STGPPretrainConfig:
        """The STGP pre-training that ``task``'s stages build on, for ``seed``."""
        des = self.stgp_pretrain.deseasonalise if self.stgp_deseasonalise_tasks is None \
            else task in self.stgp_deseasonalise_tasks
        return self.stgp_pretrain.model_copy(update={"seed": seed, "deseasonalise": des})

    @field_validator("stages", "tasks", "stgp_variants", "stgp_deseasonalise_tasks")
    @classmethod
    def _known(cls, v: list[str] | None, info) -> list[str] | None:
        if v is None:
            return v
        known = {"stages": ALL_STAGES, "tasks": list(STGP_TASKS), "stgp_deseasonalise_tasks": list(STGP_TASKS),
                 "stgp_variants": ["two_stage", "one_stage", "finetune"]}[info.field_name]
        bad = [s for s in v if s not in known]
        if bad:
            raise ValueError(f"unknown {info.field_name} {bad}; known: {known}")
        return v

    @model_validator(mode="after")
    def _target_not_source(self) -> "PipelineConfig":
        if self.target in self.sources:
            raise ValueError(f"target '{self.target}' is also a source")
        return self


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
        print(f"[{stage}] {what}: {'already in store, skipped' if skipped else 'done'} -> {aid} "
              f"({dt:.1f}s)", flush=True)
        return aid


def import_and_prepare(store, cfg: PipelineConfig, log: StageLog) -> dict[str, str]:
    """Import and prepare every source city and the target: city name -> prepared id."""
    from stgray.data.ingest import import_city
    from stgray.data.prepare import prepare_to_store

    cities = [*cfg.sources, cfg.target]
    city_ids = {n: log.run("import", n, lambda n=n: import_city(store, n)[::2]) for n in cities}
    return {n: log.run("prepare", f"{n} ({'target' if n == cfg.target else 'source'})",
                       lambda n=n: prepare_to_store(store, city_ids[n], cfg.prepare,
                                                    "target" if n == cfg.target else "source"))
            for n in cities}


def run_pipeline(cfg: PipelineConfig, until: str | None = None) -> dict[str, Any]:
    """Run the selected stages (through ``until``, if given: a stage's job runs what it
    needs first, skipping what is in the store); return the stage log, the results rows
    and the report id."""
    if until is not None:
        if until not in ALL_STAGES:
            from stgray.errors import ConfigError

            raise ConfigError(f"unknown stage '{until}'; known: {ALL_STAGES}", field="until")
        keep = ALL_STAGES[:ALL_STAGES.index(until) + 1]
        cfg = cfg.model_copy(update={"stages": [s for s in cfg.stages if s in keep]})
    from stgray.engines.common import ensure_ray
    from stgray.store import ArtifactStore

    store = ArtifactStore(cfg.store)
    if cfg.data_dir:
        os.environ["STGRAY_DATA_DIR"] = str(Path(cfg.data_dir).expanduser().resolve())
    log = StageLog()
    out: dict[str, Any] = {"store": store.url, "stages": log.rows, "rows": []}
    prepared = import_and_prepare(store, cfg, log)
    src_ids = [prepared[n] for n in cfg.sources]
    tgt_id = prepared[cfg.target]
    result_ids: list[str] = []
    if any(s in cfg.stages for s in ("zoo", "tokens", "diffusion", "gpdiff")):
        ensure_ray(cfg.ray_address)
        result_ids += _run_gpdiff(store, cfg, log, {n: prepared[n] for n in cfg.sources}, tgt_id)
    if "stgp" in cfg.stages:
        ensure_ray(cfg.ray_address)
        result_ids += _run_stgp(store, cfg, log, src_ids, tgt_id)
    if "baselines" in cfg.stages:
        result_ids.append(log.run("baselines", cfg.target, lambda: run_baselines(store, cfg, tgt_id)))
    if "report" in cfg.stages:
        rid = log.run("report", cfg.name, lambda: write_report(store, cfg, tgt_id, result_ids))
        out["report"] = rid
        out["report_md"] = store.read_bytes(rid, "report.md").decode()
    out["rows"] = collect_rows(store, result_ids, cfg.target)
    return out


def _run_gpdiff(store, cfg: PipelineConfig, log: StageLog, src: dict[str, str], tgt_id: str) -> list[str]:
    from stgray.engines.diffusion import run_diffusion
    from stgray.engines.gpdiff_transfer import run_gpdiff_transfer
    from stgray.engines.tokens import run_tokens
    from stgray.engines.zoo import run_zoo

    src_ids = list(src.values())
    zid = log.run("zoo", f"{cfg.zoo.model.arch} per-node models", lambda: run_zoo(store, cfg.zoo, src_ids))
    if "tokens" not in cfg.stages:
        return []
    tid = log.run("tokens", "layer-aware tokens + prompts", lambda: run_tokens(store, cfg.tokens, zid, src))
    if "diffusion" not in cfg.stages:
        return []
    did = log.run("diffusion", "denoiser (Ray Train + Ray Data)",
                  lambda: run_diffusion(store, cfg.diffusion, tid, cfg.diffusion_workers))
    if "gpdiff" not in cfg.stages:
        return []
    ids = []
    for seed in cfg.seeds:
        tcfg = cfg.gpdiff.model_copy(update={"seed": seed})
        ids.append(log.run("gpdiff", f"generate + few-shot seed {seed}",
                           lambda: run_gpdiff_transfer(store, tcfg, cfg.zoo, zid, tid, did, tgt_id)))
    return ids


def _run_stgp(store, cfg: PipelineConfig, log: StageLog, src_ids: list[str], tgt_id: str) -> list[str]:
    from stgray.engines.stgp import run_stgp_domain, run_stgp_pretrain, run_stgp_task

    groups: dict[bool, list[str]] = {}  # deseasonalised? -> tasks, one pre-training each
    for task in cfg.tasks:
        groups.setdefault(cfg.stgp_pretrain_for(task, 0).deseasonalise, []).append(task)
    ids = []
    for seed in cfg.seeds:
        pr_cfg = cfg.stgp_prompt.model_copy(update={"seed": seed})
        for flag, tasks in groups.items():
            pre_cfg = cfg.stgp_pretrain_for(tasks[0], seed)
            tag = f"seed {seed}" + (" (deseasonalised)" if flag else "")
            pid = log.run("stgp", f"pre-train {tag}", lambda c=pre_cfg: run_stgp_pretrain(store, c, src_ids))
            did = None
            if "two_stage" in cfg.stgp_variants:
                did = log.run("stgp", f"domain prompts {tag}",
                              lambda p=pid: run_stgp_domain(store, pr_cfg, p, tgt_id))
            for task in tasks:
                for variant in cfg.stgp_variants:
                    dom = did if variant == "two_stage" else None
                    kind = "finetune" if variant == "finetune" else "prompt"
                    ids.append(log.run("stgp", f"{task} {variant} {tag}",
                                       lambda t=task, d=dom, k=kind, p=pid: run_stgp_task(store, pr_cfg, p, d, tgt_id, t, k)))
    return ids


STGP_METHOD = {("prompt", True): "STGP (domain + task prompts)", ("prompt", False): "STGP (task prompts only)",
               ("finetune", True): "STGP full fine-tune", ("finetune", False): "STGP full fine-tune"}


def run_baselines(store, cfg: PipelineConfig, tgt_id: str) -> tuple[str, bool]:
    """Historical average and persistence (forecast), neighbour mean (kriging), neighbour
    historical average (extrapolation) on the target's test windows."""
    from stgray.data.prepare import load_prepared
    from stgray.eval import baselines as B
    from stgray.eval.metrics import forecast_metrics

    t_in, t_out = cfg.stgp_pretrain.t_in, cfg.stgp_pretrain.t_out
    config = {"t_in": t_in, "t_out": t_out, "tasks": cfg.tasks, "v": 1}
    aid = store.id_for(BASELINE_KIND, config, [tgt_id])
    if store.exists(aid):
        return aid, True
    p = load_prepared(store, tgt_id)
    rows = []
    fs = p.window_starts("test", t_in, t_out)
    truth = p.raw[fs[:, None] + t_in + np.arange(t_out)[None]]  # (B, H, N)
    preds = {}
    if "forecast" in cfg.tasks:
        for name, fn in (("historical average", B.historical_average), ("persistence", B.persistence)):
            preds[name] = fn(p, fs, t_in, t_out)
            rows.append({"task": "forecast", "method": name, **_strip(forecast_metrics(preds[name], truth))})
    un = p.unobserved
    if "kriging" in cfg.tasks and len(un):
        w = t_in + t_out
        lo, hi = p.splits["test"]
        ks = np.arange(lo, hi - w + 1)
        kt = p.raw[ks[:, None] + np.arange(w)[None]][:, :, un]
        rows.append({"task": "kriging", "method": "neighbour mean",
                     **_strip(forecast_metrics(B.kriging_neighbour_mean(p, ks, w), kt))})
    if "extrapolation" in cfg.tasks and len(un):
        rows.append({"task": "extrapolation", "method": "neighbour historical average",
                     **_strip(forecast_metrics(B.extrapolation_neighbour_ha(p, fs, t_in, t_out), truth[:, :, un]))})
    with store.writer(BASELINE_KIND, config, [tgt_id], label=f"{p.name} baselines", meta={"rows": rows}) as wr:
        buf = io.BytesIO()
        np.savez(buf, starts=fs, **{k.replace(" ", "_"): v for k, v in preds.items()})
        wr.put_bytes("forecast_preds.npz", buf.getvalue())
    return aid, False


def _strip(m: dict) -> dict:
    return {k: m[k] for k in ("mae", "rmse", "mape", "n")}


def collect_rows(store, result_ids: list[str], target: str) -> list[dict[str, Any]]:
    """One results row per (method, task, seed) from the result artifacts' manifests."""
    rows = []
    for aid in result_ids:
        m = store.manifest(aid)
        if m.kind == BASELINE_KIND:
            for r in m.meta["rows"]:
                rows.append({"target": target, **r, "seed": "-"})
        elif m.kind == "gpdiff-eval":
            for r in m.meta["rows"]:
                rows.append({"target": target, **r, "seed": m.config["transfer"]["seed"]})
        elif m.kind == "stgp-task":
            meta = m.meta
            rows.append({"target": target, "task": meta["task"],
                         "method": STGP_METHOD[(meta["variant"], meta["domain"])],
                         "seed": m.config["prompt"]["seed"], "val_mae": meta["val_mae"],
                         "trainable": meta["trainable_params"], "train_s": meta["train_seconds"],
                         **_strip(meta["test"])})
    return rows


def write_report(store, cfg: PipelineConfig, tgt_id: str, result_ids: list[str]) -> tuple[str, bool]:
    """Markdown report with the results table, the stage log and plots, as a store artifact."""
    from stgray.data.prepare import load_prepared
    from stgray.eval.report import aggregate_rows, plot_forecasts, results_markdown

    config = {"name": cfg.name, "target": cfg.target, "v": 1}
    aid = store.id_for(REPORT_KIND, config, [tgt_id, *result_ids])
    if store.exists(aid):
        return aid, True
    rows = collect_rows(store, result_ids, cfg.target)
    p = load_prepared(store, tgt_id)
    md = [f"# stgray report: {cfg.name}", "",
          f"Target **{cfg.target}** (test: steps {p.splits['test'][0]}-{p.splits['test'][1]} at "
          f"{p.step_s // 60} min), sources {', '.join(cfg.sources)}; seeds {cfg.seeds}. Every choice was "
          "made on validation (target days 4-6); test metrics are from one evaluation each, "
          "on de-normalised values (MAPE over non-zero truths).", "", "## Results", "",
          results_markdown(rows), ""]
    plots: dict[str, bytes] = {}
    base = [r for r in result_ids if store.manifest(r).kind == BASELINE_KIND]
    if base:
        with np.load(io.BytesIO(store.read_bytes(base[0], "forecast_preds.npz")), allow_pickle=False) as z:
            starts = z["starts"]
            t_in = cfg.stgp_pretrain.t_in
            nodes = np.argsort(-p.raw[p.splits["train"][0]:p.splits["train"][1]].mean(0))[:3]
            truth = p.raw[starts + t_in][:, nodes]
            preds = {k.replace("_", " "): z[k][:, 0, nodes] for k in z.files if k != "starts"}
            stgp_pred = _stgp_forecast_preds(store, result_ids)
            if stgp_pred is not None and len(stgp_pred) == len(starts):
                preds["STGP"] = stgp_pred[:, 0, nodes]
            n = min(len(truth), 7 * p.steps_per_day)
            plots["forecast_vs_truth.png"] = plot_forecasts(
                truth[:n], {k: v[:n] for k, v in preds.items()}, [f"node {i}" for i in nodes],
                title=f"{cfg.target}: 1-step-ahead forecasts, first test week")
            md += ["## Forecast vs truth", "", "![forecast vs truth](forecast_vs_truth.png)", ""]
    gp = [r for r in result_ids if store.manifest(r).kind == "gpdiff-eval"]
    if gp:
        plots["params_trained_vs_generated.png"] = store.read_bytes(gp[0], "params_trained_vs_generated.png")
        meta = store.manifest(gp[0]).meta
        md += ["## GPDiff: generated vs trained parameters", "",
               f"Sampler {meta['sampler']} with {meta['sampling_steps']} steps "
               f"({meta['sampling_seconds']:.1f} s for all target nodes); non-finite samples: "
               f"{meta['nonfinite_samples']}.", "",
               "![params](params_trained_vs_generated.png)", ""]
    md += ["## Artifacts", ""] + [f"- `{r}`" for r in result_ids]
    with store.writer(REPORT_KIND, config, [tgt_id, *result_ids], label=f"report {cfg.name}") as w:
        w.put_bytes("report.md", "\n".join(md).encode())
        w.put_json("results.json", {"rows": rows, "aggregate": aggregate_rows(rows)})
        for name, data in plots.items():
            w.put_bytes(name, data)
    return aid, False


def _stgp_forecast_preds(store, result_ids: list[str]):
    for r in result_ids:
        m = store.manifest(r)
        if m.kind == "stgp-task" and m.meta["task"] == "forecast" and m.meta["variant"] == "prompt" \
                and "test_preds.npy" in m.files:
            return np.load(io.BytesIO(store.read_bytes(r, "test_preds.npy", m)), allow_pickle=False)
    return None


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
