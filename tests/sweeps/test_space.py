"""The define-by-run space: conditional parameters, bounds, seeding, and the mapping from
parameters to trial configs (no Ray)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from stgray.errors import ConfigError
from stgray.sweeps.config import ParamSpec, load_sweep
from stgray.sweeps.space import DefineByRun, distribution, gpdiff_config, ordered, stgp_settings

BASE = Path(__file__).parent / "data" / "base_tiny.yaml"

GPDIFF_SPACE = {
    "conditioning": ParamSpec(type="categorical", choices=["adaln", "pre_adaptive", "post_adaptive"]),
    "prompt_tokens": ParamSpec(type="int", low=1, high=8, log=True,
                               when={"conditioning": ["pre_adaptive", "post_adaptive"]}),
    "sampling_steps": ParamSpec(type="int", low=2, high=20, when={"sampler": "ddim"}),
    "sampler": ParamSpec(type="categorical", choices=["ddpm", "ddim"]),
    "lr": ParamSpec(type="loguniform", low=1e-4, high=1e-2),
    "d_model": ParamSpec(type="categorical", choices=[16, 24, 32]),
}


def _sample(space: dict, seed: int, n: int = 25) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    fn = DefineByRun(space)
    study.optimize(lambda t: (fn(t), t.params.get("lr", 0.0))[1], n_trials=n)
    return [t.params for t in study.trials]


def test_conditional_parameters_only_when_their_condition_holds():
    params = _sample(GPDIFF_SPACE, seed=3)
    assert ordered(GPDIFF_SPACE).index("sampler") < ordered(GPDIFF_SPACE).index("sampling_steps")
    for p in params:
        assert ("prompt_tokens" in p) == (p["conditioning"] != "adaln")
        assert ("sampling_steps" in p) == (p["sampler"] == "ddim")
        assert 1e-4 <= p["lr"] <= 1e-2 and p["d_model"] in (16, 24, 32)
        if "prompt_tokens" in p:
            assert 1 <= p["prompt_tokens"] <= 8
    assert any("prompt_tokens" in p for p in params) and any("prompt_tokens" not in p for p in params)
    assert _sample(GPDIFF_SPACE, seed=3) == params  # seeded TPE: the same sequence
    assert _sample(GPDIFF_SPACE, seed=4) != params


def test_define_by_run_pickles_and_distributions_match():
    import pickle

    fn = pickle.loads(pickle.dumps(DefineByRun(GPDIFF_SPACE)))
    study = optuna.create_study()
    t = study.ask()
    fn(t)
    for name, value in t.params.items():
        assert distribution(GPDIFF_SPACE[name].model_dump(mode="json"))._contains(
            t.distributions[name].to_internal_repr(value))


def test_trial_configs_from_parameters():
    from stgray.pipeline import PipelineConfig

    base = PipelineConfig.load(BASE)
    cfg = gpdiff_config(base.diffusion, {"d_model": 20, "sampling_steps": 900, "num_train_timesteps": 50}, 7)
    assert cfg.heads == 2 and cfg.d_model % cfg.heads == 0  # base heads 2 divides 20
    cfg = gpdiff_config(base.diffusion.model_copy(update={"heads": 8}), {"d_model": 20}, 7)
    assert cfg.heads == 5 and cfg.train_steps == 7
    assert gpdiff_config(base.diffusion, {"sampling_steps": 900, "num_train_timesteps": 50}, 7).sampling_steps == 50
    # the base samples with DDIM in 3 steps; a DDPM trial runs the whole chain
    assert base.diffusion.sampler == "ddim" and base.diffusion.sampling_steps == 3
    assert gpdiff_config(base.diffusion, {"sampler": "ddpm", "num_train_timesteps": 40}, 7).n_sampling_steps() == 40
    assert gpdiff_config(base.diffusion, {"sampler": "ddim"}, 7).n_sampling_steps() == 3
    from stgray.sweeps.config import STGPSweepOptions

    s = stgp_settings(base, STGPSweepOptions(), {"task_prompts": 9, "lr": 0.02, "prompting": "one_stage"})
    assert s["overrides"]["task_prompts"] == 9 and s["overrides"]["domain_prompts"] == 4  # the base's
    assert s["prompt"].lr == 0.02 and s["prompt"].task_epochs == 2 and s["prompting"] == "one_stage"
    s = stgp_settings(base, STGPSweepOptions(domain_epochs=3, task_epochs=5), {"domain_epochs": 4})
    assert (s["prompt"].domain_epochs, s["prompt"].task_epochs) == (4, 5)  # the space wins over the options
    with pytest.raises(ConfigError, match="domain_prompts"):
        stgp_settings(base, STGPSweepOptions(), {"domain_prompts": 0})


def _write(tmp_path, space: dict, **extra) -> Path:
    import yaml

    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({"method": extra.pop("method", "gpdiff"), "base": str(BASE), "space": space,
                                 **extra}))
    return p


@pytest.mark.parametrize("space, method, expect", [
    ({"foo": {"type": "int", "low": 1, "high": 2}}, "gpdiff", "space.foo: unknown parameter for method 'gpdiff'"),
    ({"lr": {"type": "loguniform", "low": 0, "high": 1}}, "gpdiff", "a log scale needs low > 0"),
    ({"conditioning": {"type": "categorical", "choices": ["adaln", "bogus"]}}, "gpdiff",
     "space.conditioning: value 'bogus' refused"),
    ({"prompt_tokens": {"type": "int", "low": 1, "high": 4, "when": {"conditioning": "adaln"}}}, "gpdiff",
     "'when' names 'conditioning', which is not in the space"),
    ({"a_cycle": None}, "gpdiff", None),
    ({"task_prompts": {"type": "int", "low": 0, "high": 8}}, "stgp", "space.task_prompts: value 0 refused"),
    ({"num_train_timesteps": {"type": "int", "low": 10, "high": 20}}, "stgp", "unknown parameter for method 'stgp'"),
])
def test_bad_spaces_are_one_line_config_errors(tmp_path, space, method, expect):
    if "a_cycle" in space:  # two conditions that wait for each other
        space = {"sampler": {"type": "categorical", "choices": ["ddpm", "ddim"], "when": {"conditioning": "adaln"}},
                 "conditioning": {"type": "categorical", "choices": ["adaln"], "when": {"sampler": "ddim"}}}
        expect = "cycle"
    p = _write(tmp_path, space, method=method)
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg and msg.startswith(str(p))


def test_experiment_name_depends_on_the_work_only(tmp_path):
    import yaml

    from stgray.sweeps.config import experiment_name

    space = {"task_prompts": {"type": "int", "low": 2, "high": 8}}
    a = experiment_name(*load_sweep(_write(tmp_path, space, method="stgp", num_samples=3)))
    b = experiment_name(*load_sweep(_write(tmp_path, space, method="stgp", num_samples=3, name="other",
                                           max_concurrent=1, cpus_per_trial=2, store="/elsewhere")))
    assert a == b and a.startswith("sweep-stgp-")
    assert experiment_name(*load_sweep(_write(tmp_path, space, method="stgp", num_samples=4))) != a
    base = yaml.safe_load(BASE.read_text())
    other = {**base, "diffusion": {**base["diffusion"], "d_model": 32}}  # not used by an STGP sweep
    assert experiment_name(*load_sweep(_write(tmp_path, space, method="stgp", num_samples=3, base=other))) == a
    other = {**base, "stgp_prompt": {**base["stgp_prompt"], "task_epochs": 3}}
    assert experiment_name(*load_sweep(_write(tmp_path, space, method="stgp", num_samples=3, base=other))) != a


def test_concurrency_from_cluster_cpus(tmp_path):
    from stgray.sweeps.driver import concurrency

    space = {"task_prompts": {"type": "int", "low": 2, "high": 8}}
    cfg, _ = load_sweep(_write(tmp_path, space, method="stgp", num_samples=8))
    assert concurrency(cfg, {"CPU": 3.0}) == 3
    assert concurrency(cfg.model_copy(update={"cpus_per_trial": 2}), {"CPU": 5.0}) == 2
    assert concurrency(cfg.model_copy(update={"num_samples": 2}), {"CPU": 16.0}) == 2
    assert concurrency(cfg.model_copy(update={"max_concurrent": 1}), {"CPU": 16.0}) == 1
    with pytest.raises(ConfigError, match="needs 4 CPUs but the Ray cluster has 3"):
        concurrency(cfg.model_copy(update={"cpus_per_trial": 4}), {"CPU": 3.0})
