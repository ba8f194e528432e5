"""Synthetic cities: shape, determinism, the spatial-correlation knob, names, the store."""

from __future__ import annotations

import numpy as np
import pytest

from stgray.data.city import read_city
from stgray.data.ingest import import_city
from stgray.data.prepare import PrepareConfig, prepare
from stgray.data.synthetic import (SynthConfig, generate, import_synthetic, neighbour_residual_corr,
                                   parse_name)
from stgray.data.validate import validate_city
from stgray.errors import ConfigError, DataError


def test_shape_graph_and_validation():
    c = generate(SynthConfig(nodes=60, days=7, step_s=1800, k=5, seed=1))
    assert c.series.shape == (7 * 48, 60, 1) and c.series.dtype == np.float32
    assert c.step_s == 1800 and c.features == ["inflow"] and c.aggregation == ["sum"]
    validate_city(c)
    assert (c.series >= 0).all() and np.array_equal(c.series, np.round(c.series))  # counts
    e = {tuple(x) for x in c.edges.tolist()}
    assert all((b, a) in e for a, b in e)  # undirected: both directions
    assert not any(a == b for a, b in e)
    deg = np.bincount(c.edges[:, 0], minlength=60)
    assert deg.min() >= 5
    assert ((c.weights > 0) & (c.weights <= 1)).all()
    assert c.coords.shape == (60, 2)
    r = generate(SynthConfig(nodes=30, days=3, counts=False))
    assert r.units == ["rate/step"] and not np.array_equal(r.series, np.round(r.series))


def test_deterministic_for_a_seed():
    a = generate(SynthConfig(nodes=40, days=5, seed=3))
    b = generate(SynthConfig(nodes=40, days=5, seed=3))
    c = generate(SynthConfig(nodes=40, days=5, seed=4))
    assert np.array_equal(a.series, b.series) and np.array_equal(a.edges, b.edges)
    assert np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.series, c.series)


def test_spatial_correlation_grows_with_the_knob():
    corr = [neighbour_residual_corr(generate(SynthConfig(nodes=120, days=28, spatial_corr=r, seed=0)))
            for r in (0.0, 0.4, 0.8)]
    assert abs(corr[0]) < 0.05
    assert corr[0] + 0.1 < corr[1] < corr[2] - 0.1


def test_seasonality_knobs():
    flat = generate(SynthConfig(nodes=30, days=14, daily_amplitude=0, weekly_amplitude=0, noise=0,
                                counts=False))
    assert np.allclose(flat.series, flat.series[:1])  # constant per node
    daily = generate(SynthConfig(nodes=30, days=14, weekly_amplitude=0, noise=0, counts=False))
    s = daily.series[:, :, 0]
    assert np.allclose(s[:24 * 7], s[24 * 7:], rtol=1e-5)  # a daily cycle repeats
    assert (s.max(0) / np.maximum(s.min(0), 1e-6) > 3).all()
    weekly = generate(SynthConfig(nodes=30, days=14, daily_amplitude=0, noise=0, counts=False))
    w = weekly.series[:, 0, 0]
    assert w[:24].mean() > w[5 * 24:6 * 24].mean()  # Monday busier than Saturday


def test_names_round_trip_and_errors():
    cfg = SynthConfig(nodes=500, seed=7, spatial_corr=0.25, counts=False)
    assert cfg.name == "synth:counts=false:nodes=500:seed=7:spatial_corr=0.25"
    assert parse_name(cfg.name) == cfg
    assert parse_name("synth:default") == SynthConfig()
    with pytest.raises(ConfigError, match="nodes"):
        parse_name("synth:nodes=x")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_name("synth:colour=red")
    with pytest.raises(ConfigError, match="key=value"):
        parse_name("synth:nodes")
    with pytest.raises(ConfigError, match="write this city as 'synth:nodes=500:seed=7'"):
        parse_name("synth:seed=7:nodes=500:k=8")  # one spelling per city
    with pytest.raises(ConfigError, match="k=8 must be below"):
        SynthConfig.from_mapping({"nodes": 5})


def test_store_import_is_idempotent_and_prepares(local_store):
    name = "synth:days=10:nodes=25:seed=2"
    aid, city, skipped = import_city(local_store, name)
    assert not skipped and city.name == name
    aid2, city2, skipped2 = import_city(local_store, name)
    assert skipped2 and aid2 == aid
    assert np.array_equal(read_city(local_store, aid).series, city.series)
    assert import_synthetic(local_store, parse_name(name))[0] == aid
    assert local_store.manifest(aid).config["format"] == "synthetic"
    with pytest.raises(DataError, match="no format or file options"):
        import_city(local_store, name, options={"step": "1h"})
    p = prepare(city, PrepareConfig(feature="inflow", target_test_days=3), "target")
    assert p.splits["test"] == (144, 216) and p.num_nodes == 25


def test_cli_synth(cli, tmp_path):
    r = cli("data", "synth", "--nodes", "20", "--days", "3", "--seed", "5", "--store", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert "synth:days=3:nodes=20:seed=5" in r.stdout and "generated" in r.stdout
    r = cli("data", "synth", "--nodes", "4", "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "k=8 must be below nodes=4" in r.stderr


def test_pipeline_takes_synthetic_cities_by_name(tmp_path):
    from stgray.pipeline import PipelineConfig, run_pipeline

    src, tgt = "synth:days=12:nodes=30:seed=1", "synth:days=10:nodes=20:seed=2"
    cfg = PipelineConfig(sources=[src], target=tgt, store=str(tmp_path / "store"),
                         stages=["prepare", "baselines"], prepare={"target_test_days": 4})
    res = run_pipeline(cfg)
    assert [r["status"] for r in res["stages"] if r["stage"] == "import"] == ["done", "done"]
    methods = {(r["task"], r["method"]) for r in res["rows"]}
    assert ("forecast", "historical average") in methods and ("kriging", "neighbour mean") in methods
    assert all(r["target"] == tgt and np.isfinite(r["mae"]) for r in res["rows"])
    again = run_pipeline(cfg)
    assert all(r["status"] == "skipped (in store)" for r in again["stages"])
