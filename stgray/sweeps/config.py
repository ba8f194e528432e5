"""The sweep config: which method, which base pipeline, which space, how many trials.

A sweep reuses a pipeline config (``base``: a path relative to the sweep file, or the
mapping itself): its prepared data, STGP pre-training, zoo and tokens are found in the
store by hash (and made once if missing), and every trial starts from them. Execution
settings (store, Ray address, concurrency, CPUs per trial, the label ``name``) enter no
hash, so the experiment name ``sweep-<hash>`` is the same for the same work wherever it
runs, and running the same config again resumes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from stgray.config import StageConfig, content_hash, read_config_file
from stgray.errors import ConfigError

if TYPE_CHECKING:  # the pipeline imports every engine: not needed in a trial's process
    from stgray.pipeline import PipelineConfig

Method = Literal["stgp", "gpdiff"]
METRIC, MODE = "val_mae", "min"


class ParamSpec(StageConfig):
    """One dimension of the space. ``int``/``float``: ``low``..``high`` (inclusive;
    ``log``: log scale; ``step``: grid step); ``loguniform``: float on a log scale;
    ``categorical``: ``choices``. ``when``: sample only if every named parameter has
    the given value (or one of a list of values); otherwise the base value is used."""

    type: Literal["int", "float", "loguniform", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    log: bool = False
    choices: list[str | bool | int | float | None] | None = Field(None, min_length=1)
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "ParamSpec":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs 'choices'")
            if self.low is not None or self.high is not None:
                raise ValueError("categorical takes 'choices', not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if (self.log or self.type == "loguniform") and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int bounds must be whole numbers")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log' cannot be combined")
        return self

    def values_to_check(self) -> list[Any]:
        """Representative values (every choice, both bounds) for validation."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


class SchedulerConfig(StageConfig):
    """Early stopping: ``asha`` (async successive halving on ``val_mae`` after each
    iteration: an STGP task epoch, a GPDiff evaluation round) or ``fifo`` (none)."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, gt=0, description="iterations before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SearcherConfig(StageConfig):
    """Optuna sampler: ``tpe`` (seeded by the sweep's ``seed``) or ``random``."""

    sampler: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(4, ge=0, description="TPE: random trials before modelling")


class STGPSweepOptions(StageConfig):
    """STGP trials: domain prompting (two-stage) then task prompting of ``task`` on the
    base's pre-trained model; settings from the base ``stgp_prompt`` unless given here
    (task epochs = the iterations ASHA sees)."""

    task: Literal["forecast", "kriging", "extrapolation"] = "forecast"
    prompting: Literal["two_stage", "one_stage"] = Field(
        "two_stage", description="when 'prompting' is not in the space")
    domain_epochs: int | None = Field(None, gt=0, description="default: the base's")
    task_epochs: int | None = Field(None, gt=0, description="default: the base's")


class GPDiffSweepOptions(StageConfig):
    """GPDiff trials: train a denoiser in the trial's process on the base's tokens for
    ``train_steps`` steps (default: the base diffusion's), evaluated ``rounds`` times:
    generate ``samples_per_node`` parameter sets per target node, pick each node's on the
    target's *train* days, score on validation. ``few_shot`` also fine-tunes the pick
    for ``finetune_epochs`` (epoch chosen on train days)."""

    train_steps: int | None = Field(None, gt=0)
    rounds: int = Field(3, gt=0, description="evaluations per trial (the iterations ASHA sees)")
    samples_per_node: int = Field(2, gt=0)
    node_limit: int | None = Field(None, gt=0, description="evaluate the first n target nodes only")
    objective: Literal["zero_shot", "few_shot"] = "zero_shot"
    finetune_epochs: int = Field(3, ge=0)


class SweepConfig(StageConfig):
    """A sweep. See configs/sweep_stgp.yaml and configs/sweep_gpdiff.yaml."""

    _unhashed: ClassVar[frozenset[str]] = frozenset(
        {"name", "store", "data_dir", "ray_address", "max_concurrent", "cpus_per_trial", "base"})

    name: str = Field("sweep", description="label only (the experiment name is sweep-<hash>)")
    method: Method
    base: str | dict[str, Any] = Field(..., description="pipeline config: path (relative to this "
                                                        "file) or mapping")
    store: str | None = Field(None, description="default: the base's store, $STGRAY_STORE, ./stgray-store")
    data_dir: str | None = None
    ray_address: str | None = None
    num_samples: int = Field(8, gt=0, description="trials")
    seed: int = Field(0, description="searcher seed")
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent: int | None = Field(None, gt=0, description="default: cluster CPUs // cpus_per_trial")
    cpus_per_trial: int = Field(1, gt=0, description="CPUs (and torch threads) of one trial")
    space: dict[str, ParamSpec] = Field(..., min_length=1)
    stgp: STGPSweepOptions = Field(default_factory=STGPSweepOptions)
    gpdiff: GPDiffSweepOptions = Field(default_factory=GPDiffSweepOptions)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepConfig, "PipelineConfig"]:
    """Read a sweep YAML and its base pipeline config; check the space against the method.
    ``overrides``: top-level sweep fields (CLI options) applied before validation."""
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError("a sweep config must be a mapping", where=str(path))
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    cfg = SweepConfig.from_mapping(data, where=str(path))
    base = resolve_base(cfg, Path(path).parent, where=str(path))
    from stgray.sweeps.space import check_space

    check_space(cfg, base, where=str(path))
    return cfg, base


def resolve_base(cfg: SweepConfig, folder: Path, where: str = "sweep") -> "PipelineConfig":
    from stgray.pipeline import PipelineConfig

    if isinstance(cfg.base, dict):
        return PipelineConfig.from_mapping(cfg.base, where=f"{where}: base")
    p = Path(cfg.base).expanduser()
    if not p.is_absolute():
        p = folder / p if (folder / p).is_file() or not p.is_file() else p
    if not p.is_file():
        raise ConfigError(f"base pipeline config '{cfg.base}' not found (relative to {folder})",
                          where=where, field="base")
    return PipelineConfig.load(p)


def base_hash_dict(cfg: SweepConfig, base: "PipelineConfig") -> dict[str, Any]:
    """The parts of the base that a trial of ``cfg.method`` depends on."""
    h = base.hashed_dict()
    keys = ["sources", "target", "prepare"]
    keys += ["stgp_pretrain", "stgp_prompt"] if cfg.method == "stgp" else ["zoo", "tokens", "diffusion"]
    out = {k: h[k] for k in keys}
    if cfg.method == "stgp" and "stgp_deseasonalise_tasks" in h:
        out["stgp_deseasonalise_tasks"] = h["stgp_deseasonalise_tasks"]
    out["seed"] = base.seeds[0]
    return out


def experiment_name(cfg: SweepConfig, base: "PipelineConfig") -> str:
    """``sweep-<method>-<hash>``: a hash of the sweep and of the base parts it uses."""
    return f"sweep-{cfg.method}-{content_hash({'sweep': cfg.hashed_dict(), 'base': base_hash_dict(cfg, base)}, 12)}"
