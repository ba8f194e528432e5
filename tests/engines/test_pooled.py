"""The pooled-source baseline: one shared per-node model over all source nodes."""

from __future__ import annotations

import dataclasses

import numpy as np

from stgray.data.prepare import PrepareConfig, prepare
from stgray.engines.pooled import train_pooled
from stgray.engines.zoo import ZooConfig, predict_nodes
from stgray.nn.gpdiff.pernode import PerNodeArch, make_layout

from .test_zoo import nyc_bike


def test_pooled_model_is_shared_selected_on_source_validation_and_learns(datasets_dir):
    a = prepare(nyc_bike(datasets_dir, days=20, nodes=6), PrepareConfig(), "source")
    b = prepare(dataclasses.replace(nyc_bike(datasets_dir, days=12, nodes=4), name="bike_b"),
                PrepareConfig(), "source")
    cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), lr=3e-3, node_limit=5, batch_size=32)
    vec, info = train_pooled([a, b], cfg, epochs=3, device="cpu")
    assert vec.shape == (make_layout(cfg.model).n_params,) and vec.dtype == np.float32
    assert np.isfinite(vec).all()
    assert info["source_models"] == 5 + 4  # node_limit per city
    hist = info["val_mse_norm"]
    assert len(hist) == 4 and info["best_epoch"] == int(np.argmin(hist))  # chosen on validation
    assert min(hist[1:]) < hist[0]  # training reduced the sources' validation error
    # one vector for every node: copies of it predict each node from its own neighbourhood
    va = a.window_starts("val", 12, 6)[:40]
    pred = predict_nodes(a, np.repeat(vec[None], 3, 0), cfg, [0, 1, 2], va)
    assert pred.shape == (40, 6, 3) and np.isfinite(pred).all()
