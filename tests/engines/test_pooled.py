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


def test_target_side_training_follows_the_run_seed_and_its_own_batch(datasets_dir):
    from stgray.engines.gpdiff_transfer import TransferConfig, target_training
    from stgray.engines.zoo import train_models

    zoo_cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), lr=1e-4, batch_size=64, seed=7)
    t0, t1 = (target_training(zoo_cfg, TransferConfig(seed=s, batch_size=8, lr=3e-3)) for s in (0, 1))
    assert (t0.batch_size, t0.lr, t0.seed, t1.seed) == (8, 3e-3, 0, 1)
    cos_zoo = zoo_cfg.model_copy(update={"lr_schedule": "cosine"})  # the target keeps its own schedule
    assert target_training(cos_zoo, TransferConfig()).lr_schedule == "constant"
    assert target_training(zoo_cfg, TransferConfig(lr_schedule="cosine")).lr_schedule == "cosine"
    # and its own early stopping (an option added later: unset, it leaves artefact names alone)
    assert target_training(zoo_cfg.model_copy(update={"patience": 3}), TransferConfig()).patience is None
    assert target_training(zoo_cfg, TransferConfig(patience=10)).patience == 10
    assert target_training(zoo_cfg, TransferConfig(select_on="mae")).select_on == "mae"
    assert not {"patience", "select_on"} & set(TransferConfig().hashed_dict())
    assert t0.model == zoo_cfg.model
    p = prepare(nyc_bike(datasets_dir, days=8, nodes=3), PrepareConfig(), "target")
    a, b = (train_models(p, [0, 1], c, epochs=1).params for c in (t0, t1))
    assert not np.array_equal(a, b)  # a seed's scratch models are its own (std over seeds > 0)
    src = prepare(nyc_bike(datasets_dir, days=8, nodes=3), PrepareConfig(), "source")
    va, vb = (train_pooled([src], zoo_cfg.model_copy(update={"seed": s}), epochs=1, device="cpu")[0]
              for s in (0, 1))
    assert not np.array_equal(va, vb)


def test_pooled_training_follows_the_zoo_schedule(datasets_dir):
    """Cosine decays the step size over the pooled run as it does for each zoo model."""
    from stgray.engines.zoo import scheduled_lr

    cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), lr=4e-3, node_limit=2, batch_size=32)
    cos = cfg.model_copy(update={"lr_schedule": "cosine"})
    assert scheduled_lr(cfg, 2, 3, 2, 10) == 4e-3  # (epoch, step, epochs, steps per epoch)
    assert scheduled_lr(cos, 1, 0, 2, 10) == 4e-3 and scheduled_lr(cos, 2, 0, 2, 10) == 2e-3 \
        and scheduled_lr(cos, 3, 0, 2, 10) < 1e-12
    src = prepare(nyc_bike(datasets_dir, days=8, nodes=2), PrepareConfig(), "source")
    vc, vk = (train_pooled([src], c, epochs=2, device="cpu")[0] for c in (cfg, cos))
    assert np.isfinite(vk).all() and not np.array_equal(vc, vk)


def test_few_shot_init_mix_interpolates_between_generated_and_the_scratch_start(datasets_dir):
    from stgray.engines.gpdiff_transfer import TransferConfig, mixed_init, target_training
    from stgray.engines.zoo import train_models

    tc = target_training(ZooConfig(model=PerNodeArch(arch="stgcn", baseline="tod_mean")), TransferConfig(seed=3))
    p = prepare(nyc_bike(datasets_dir, days=8, nodes=3), PrepareConfig(), "target")
    nodes = np.array([0, 2])
    gen = np.random.default_rng(0).normal(size=(2, make_layout(tc.model).n_params)).astype(np.float32)
    assert mixed_init(gen, tc, p.name, nodes, 1.0) is gen  # the default: the generated model as is
    # mix 0.25 -> the fresh part is exactly the scratch model's epoch-0 parameters
    scratch0 = train_models(p, nodes, tc, epochs=0).params
    mixed = mixed_init(gen, tc, p.name, nodes, 0.25)
    np.testing.assert_allclose((mixed - 0.25 * gen) / 0.75, scratch0, rtol=1e-4, atol=1e-5)
    assert "init_mix" not in TransferConfig().hashed_dict()  # unset, artefact names stay
    assert TransferConfig(init_mix=0.5).hashed_dict()["init_mix"] == 0.5


def test_few_shot_from_k_candidates_keeps_each_nodes_best_on_validation(datasets_dir):
    from stgray.engines.gpdiff_transfer import TransferConfig, finetune_best, target_training
    from stgray.engines.zoo import finetune_nodes

    tc = target_training(ZooConfig(model=PerNodeArch(arch="stgcn", baseline="tod_mean")),
                         TransferConfig(seed=1, select_on="mae"))
    p = prepare(nyc_bike(datasets_dir, days=8, nodes=3), PrepareConfig(), "target")
    nodes = np.array([0, 1, 2])
    gen = np.random.default_rng(0).normal(0, 0.1, size=(3, 3, make_layout(tc.model).n_params)).astype(np.float32)
    cand = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])  # zero-shot validation MAE
    one, pick1 = finetune_best(p, gen, cand, tc, 2, nodes, 1.0, 1)
    np.testing.assert_array_equal(pick1, [1, 0, 2])  # k=1: each node's best zero-shot sample
    np.testing.assert_array_equal(one, finetune_nodes(p, gen[[0, 1, 2], [1, 0, 2]], tc, 2, node_ids=nodes))
    two, pick2 = finetune_best(p, gen, cand, tc, 2, nodes, 1.0, 2)
    assert all(k in top for k, top in zip(pick2, ([1, 2], [0, 1], [2, 0])))
    # the kept model is, per node, the fine-tuned candidate of least validation MAE
    both = finetune_nodes(p, gen[[0, 0, 1, 1, 2, 2], [1, 2, 0, 1, 2, 0]], tc, 2,
                          node_ids=np.repeat(nodes, 2), return_result=True)  # the same 6 runs
    keep = both.val_mae.reshape(3, 2).argmin(1)
    np.testing.assert_array_equal(two, both.params.reshape(3, 2, -1)[[0, 1, 2], keep])
    np.testing.assert_array_equal(pick2, np.array([[1, 2], [0, 1], [2, 0]])[[0, 1, 2], keep])
    assert "finetune_candidates" not in TransferConfig().hashed_dict()
    assert TransferConfig(finetune_candidates=2).hashed_dict()["finetune_candidates"] == 2
