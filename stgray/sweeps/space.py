"""The search space: a YAML mapping of ``ParamSpec`` turned into an Optuna define-by-run
function (conditional parameters are only suggested when their ``when`` holds), and the
mapping from a trial's parameters to the configs a trial runs with.

STGP parameters: ``domain_prompts``, ``task_prompts`` (bank sizes K), ``prompt_threshold``,
``prompt_init_std`` (model prompt settings on the pre-trained weights), ``lr``,
``domain_epochs``, ``batch_size`` (prompting), ``prompting`` (``two_stage``/``one_stage``).
GPDiff parameters: any ``DiffusionConfig`` field but seed/device/amp/stats_eps/train_steps,
e.g. ``num_train_timesteps`` (diffusion steps), ``beta_schedule``, ``prediction_type``,
``sampler``, ``sampling_steps``, ``d_model``, ``layers``, ``conditioning``,
``prompt_tokens``, ``token_width`` (tokenisation), ``lr``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from stgray.config import _first_error
from stgray.errors import ConfigError
from stgray.gpdiff.diffusion import DiffusionConfig

STGP_MODEL_PARAMS = ("domain_prompts", "task_prompts", "prompt_threshold", "prompt_init_std")
STGP_PROMPT_PARAMS = ("lr", "domain_epochs", "batch_size")
STGP_PARAMS = (*STGP_MODEL_PARAMS, *STGP_PROMPT_PARAMS, "prompting")
GPDIFF_EXCLUDED = ("seed", "device", "amp", "stats_eps", "train_steps")
GPDIFF_PARAMS = tuple(f for f in DiffusionConfig.model_fields if f not in GPDIFF_EXCLUDED)


def known_params(method: str) -> tuple[str, ...]:
    return STGP_PARAMS if method == "stgp" else GPDIFF_PARAMS


def condition_holds(when: dict[str, Any] | None, values: dict[str, Any]) -> bool:
    """``when`` holds if each named parameter was sampled with (one of) the given value(s)."""
    for name, want in (when or {}).items():
        if name not in values:
            return False
        opts = want if isinstance(want, list) else [want]
        if values[name] not in opts:
            return False
    return True


def ordered(space: dict) -> list[str]:
    """Parameter names with every ``when`` dependency before its dependants (YAML order
    otherwise); a cycle is a ConfigError."""
    out: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ConfigError(f"'when' conditions form a cycle: {' -> '.join(chain + [n])}",
                              field=f"space.{n}")
        state[n] = 1
        for dep in (space[n].when or {}):
            visit(dep, chain + [n])
        state[n] = 2
        out.append(n)

    for n in space:
        visit(n, [])
    return out


class DefineByRun:
    """Optuna define-by-run space (picklable, as Tune saves its searcher): call with an
    ``optuna.Trial``; returns nothing (OptunaSearch records what was suggested)."""

    def __init__(self, space: dict):
        self.specs = {n: space[n].model_dump(mode="json") for n in space}
        self.order = ordered(space)

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for name in self.order:
            s = self.specs[name]
            if not condition_holds(s.get("when"), values):
                continue
            values[name] = suggest(trial, name, s)
        return None


def suggest(trial, name: str, s: dict) -> Any:
    t = s["type"]
    if t == "categorical":
        return trial.suggest_categorical(name, s["choices"])
    if t == "int":
        return trial.suggest_int(name, int(s["low"]), int(s["high"]), step=int(s["step"] or 1), log=bool(s["log"]))
    if t == "loguniform":
        return trial.suggest_float(name, float(s["low"]), float(s["high"]), log=True)
    return trial.suggest_float(name, float(s["low"]), float(s["high"]), step=s["step"], log=bool(s["log"]))


def distribution(s: dict):
    """The ``optuna.distributions`` object of a spec (as ``suggest`` samples it)."""
    import optuna.distributions as D

    t = s["type"]
    if t == "categorical":
        return D.CategoricalDistribution(s["choices"])
    if t == "int":
        return D.IntDistribution(int(s["low"]), int(s["high"]), step=int(s["step"] or 1), log=bool(s["log"]))
    return D.FloatDistribution(float(s["low"]), float(s["high"]), step=s["step"],
                               log=bool(s["log"]) or t == "loguniform")


# ------------------------------------------------------------------------------------
# parameters -> trial settings
# ------------------------------------------------------------------------------------
def stgp_settings(base, opts, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's STGP settings: ``prompt`` (STGPPromptConfig; seed = the base's first seed),
    ``overrides`` (prompt settings of the pre-trained model), ``prompting``, ``task``."""
    from stgray.engines.stgp import STGPPromptConfig

    bad = sorted(set(params) - set(STGP_PARAMS))
    if bad:
        raise ConfigError(f"unknown STGP parameter(s) {bad}; known: {list(STGP_PARAMS)}", field="space")
    upd = {k: v for k, v in (("domain_epochs", opts.domain_epochs), ("task_epochs", opts.task_epochs)) if v}
    upd.update({k: params[k] for k in STGP_PROMPT_PARAMS if k in params})
    upd["seed"] = base.seeds[0]
    try:
        prompt = STGPPromptConfig.model_validate({**base.stgp_prompt.model_dump(mode="json"), **upd})
    except ValidationError as e:
        raise ConfigError(_first_error(e), field="space") from None
    m = base.stgp_pretrain.model
    overrides = {k: params.get(k, getattr(m, k)) for k in STGP_MODEL_PARAMS}
    prompting = params.get("prompting", opts.prompting)
    if prompting not in ("two_stage", "one_stage"):
        raise ConfigError(f"'{prompting}' is not two_stage or one_stage", field="space.prompting")
    if not overrides["task_prompts"] or overrides["task_prompts"] < 1:
        raise ConfigError("task_prompts must be >= 1", field="space.task_prompts")
    if prompting == "two_stage" and (not overrides["domain_prompts"] or overrides["domain_prompts"] < 1):
        raise ConfigError("domain_prompts must be >= 1 for two-stage prompting", field="space.domain_prompts")
    if not 0 <= float(overrides["prompt_threshold"]) <= 1:
        raise ConfigError("prompt_threshold must be in [0, 1]", field="space.prompt_threshold")
    return {"prompt": prompt, "overrides": overrides, "prompting": prompting, "task": opts.task}


def gpdiff_config(base_diffusion: DiffusionConfig, params: dict[str, Any], train_steps: int) -> DiffusionConfig:
    """The trial's DiffusionConfig: the base's with ``params`` applied. ``heads`` drops to
    the largest divisor of ``d_model`` not above it; the base's ``sampling_steps`` only
    goes with the base's sampler (a trial that switches sampler without sampling its
    steps gets the sampler's default: every step for DDPM, 50 for DDIM); sampling steps
    are capped at the diffusion steps."""
    bad = sorted(set(params) - set(GPDIFF_PARAMS))
    if bad:
        raise ConfigError(f"unknown GPDiff parameter(s) {bad}; known: {list(GPDIFF_PARAMS)}", field="space")
    d = {**base_diffusion.model_dump(mode="json"), **params, "train_steps": int(train_steps)}
    if "sampling_steps" not in params and d["sampler"] != base_diffusion.sampler:
        d["sampling_steps"] = None
    dm, h = int(d["d_model"]), int(d["heads"])
    if dm > 0 and h > 0 and dm % h:
        d["heads"] = max(k for k in range(1, h + 1) if dm % k == 0)
    if d.get("sampling_steps") is not None and d["sampling_steps"] > d["num_train_timesteps"]:
        d["sampling_steps"] = int(d["num_train_timesteps"])
    try:
        return DiffusionConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_first_error(e), field="space") from None


def check_space(cfg, base, where: str = "sweep") -> None:
    """Refuse unknown parameters, bad ``when`` references and values the configs reject
    (each value tried on its own against the base)."""
    known = known_params(cfg.method)
    for name, spec in cfg.space.items():
        if name not in known:
            raise ConfigError(f"unknown parameter for method '{cfg.method}'; known: {', '.join(known)}",
                              where=where, field=f"space.{name}")
        for dep, want in (spec.when or {}).items():
            if dep not in cfg.space:
                raise ConfigError(f"'when' names '{dep}', which is not in the space", where=where,
                                  field=f"space.{name}")
            other = cfg.space[dep]
            if other.type == "categorical":
                opts = want if isinstance(want, list) else [want]
                miss = [w for w in opts if w not in (other.choices or [])]
                if miss:
                    raise ConfigError(f"'when' value(s) {miss} are not choices of '{dep}'", where=where,
                                      field=f"space.{name}")
    try:
        ordered(cfg.space)
    except ConfigError as e:
        raise ConfigError(e.problem, where=where, field=e.field) from None
    for name, spec in cfg.space.items():
        for v in spec.values_to_check():
            try:
                if cfg.method == "stgp":
                    stgp_settings(base, cfg.stgp, {name: v})
                else:
                    gpdiff_config(base.diffusion, {name: v}, cfg.gpdiff.train_steps or base.diffusion.train_steps)
            except ConfigError as e:
                raise ConfigError(f"value {v!r} refused ({e.problem})", where=where,
                                  field=f"space.{name}") from None
    if cfg.method == "gpdiff" and not (cfg.gpdiff.train_steps or base.diffusion.train_steps):
        raise ConfigError("train_steps must be > 0 (gpdiff.train_steps or the base's diffusion)",
                          where=where, field="gpdiff.train_steps")
