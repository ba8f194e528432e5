"""The diffusion stage on Ray Train with Ray Data input from the S3 store, and generation.

One real ``TorchTrainer`` fit (1 worker, a few steps, a tiny denoiser) on a tiny test zoo
in the SeaweedFS store; the other tests reuse its artifact.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from stgray.engines.diffusion import (DIFFUSION_KIND, diffusion_id_for, generate_params,
                                      load_denoiser, run_diffusion, training_config)
from stgray.engines.tokens import TokensConfig, load_tokens_info, run_tokens
from stgray.errors import ConfigError, DataError, IntegrityError
from stgray.gpdiff.diffusion import DiffusionConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_tokens import small_sources, write_test_zoo  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> DiffusionConfig:
    base = dict(token_width=8, d_model=16, layers=1, heads=2, ff_mult=2, lr=3e-3,
                batch_size=4, ema_decay=0.9, train_steps=5, num_train_timesteps=50)
    return DiffusionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def s3_mod_store(s3_server):
    from stgray.store import ArtifactStore

    return ArtifactStore(f"s3://{s3_server.bucket}/d-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def tokens(s3_mod_store):
    store = s3_mod_store
    srcs = small_sources(store)  # 12 nodes in two cities
    zoo_id, params = write_test_zoo(store, srcs)
    tid, _ = run_tokens(store, TokensConfig(width=8, rows_per_shard=5), zoo_id)
    return store, tid, params


@pytest.fixture(scope="module")
def trained(tokens, ray_session):
    store, tid, _ = tokens
    cfg = tiny_cfg()
    info: dict = {}
    # 12 rows, batch 4: 3 steps an epoch -> 5 steps cross an epoch boundary; checkpoints
    # at steps 3 and 5. The tiny token set is read from S3 once and cached in Ray's object
    # store (cache="auto"); uncached, every epoch re-reads the shards (about 6 s an epoch
    # on a busy 2-core machine), which bench/token_pipeline.py exercises.
    did, skipped = run_diffusion(store, cfg, tid, 1, use_gpu=False, checkpoint_every=3,
                                 log_every=1, info=info)
    assert not skipped
    return store, tid, did, cfg, info


def test_run_diffusion_with_ray_data_from_s3(trained):
    store, tid, did, cfg, info = trained
    m = store.manifest(did)
    assert m.kind == DIFFUSION_KIND and m.inputs == [tid]
    assert m.config == training_config(cfg)
    assert not {"sampler", "sampling_steps", "ddim_eta", "device"} & set(m.config)
    assert m.meta["train_steps"] == 5 and m.meta["tokens_per_s"] > 0
    assert info["tokens_per_s"] > 0 and info["ray_run"].startswith("diffusion-")
    hist = store.read_json(did, "history.json")
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in hist] == [0, 0, 0, 1, 1]  # two passes over the data
    assert all(np.isfinite(h["loss"]) for h in hist)
    den = load_denoiser(store, did)
    assert den.tokens_id == tid and den.prompt_dim == 39
    assert not den.model.training
    # the checkpoints live inside the store (S3), under the run's name
    assert store.fs.ls(f"{store.location.root}/_ray/{info['ray_run']}")


def test_dataset_split_into_small_read_tasks_delivers_every_row_once(tokens, ray_session):
    from stgray.engines.diffusion import build_dataset, token_collate

    store, tid, _ = tokens
    ti = load_tokens_info(store, tid)
    ds = build_dataset(store, ti, cache=False, block_bytes=1)  # as many tasks as row groups allow
    assert set(ds.columns()) == {"tokens", "prompt"}  # projected inside the read
    got = torch.cat([b["tokens"] for b in ds.iter_torch_batches(batch_size=5, collate_fn=token_collate())])
    whole = torch.cat([b["tokens"] for b in build_dataset(store, ti, cache=False).iter_torch_batches(
        batch_size=5, collate_fn=token_collate())])
    assert got.shape == (ti.rows, ti.n_tokens * ti.width)
    key = lambda t: sorted(map(tuple, t[:, :4].tolist()))  # noqa: E731
    assert key(got) == key(whole)


def test_second_call_skips_and_sampling_settings_are_not_in_the_key(trained):
    store, tid, did, cfg, _ = trained
    assert run_diffusion(store, cfg, tid) == (did, True)
    other_sampling = cfg.model_copy(update={"sampler": "ddim", "sampling_steps": 7,
                                            "ddim_eta": 0.5, "device": "cpu"})
    assert run_diffusion(store, other_sampling, tid, num_workers=2) == (did, True)
    assert diffusion_id_for(store, cfg.model_copy(update={"lr": 1e-3}), tid) != did
    with pytest.raises(ConfigError, match="token_width"):
        run_diffusion(store, tiny_cfg(token_width=16), tid)


def test_generate_params_shapes_and_determinism(trained):
    store, tid, did, cfg, _ = trained
    ti = load_tokens_info(store, tid)
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(3, 39)).astype(np.float32)
    info: dict = {}
    a = generate_params(store, did, tid, prompts, "ddim", 5, samples_per_node=2, seed=1, info=info)
    assert a.shape == (3, 2, ti.param_layout.n_params) and a.dtype == np.float32
    assert np.isfinite(a).all()
    assert info["sampler"] == "ddim" and info["steps"] == 5 and info["sampling_seconds"] > 0
    b = generate_params(store, did, None, prompts, "ddim", 5, samples_per_node=2, seed=1,
                        batch_size=2)
    # same seed -> same samples whatever the batching, up to float32 rounding (a different
    # batch size can take a different GEMM kernel)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[:, 0], a[:, 1])  # samples of one node differ
    c = generate_params(store, did, tid, prompts, "ddim", 5, samples_per_node=2, seed=2)
    assert not np.allclose(a, c)
    # a node's samples depend on its key, not on which other nodes are generated
    d = generate_params(store, did, tid, prompts[2:], "ddim", 5, samples_per_node=2, seed=1,
                        node_keys=[2])
    np.testing.assert_allclose(d[0], a[2], rtol=1e-5, atol=1e-6)
    # DDPM runs too (its default is every training step: 50 here); not clamped
    e = generate_params(store, did, tid, prompts[:1], "ddpm", None, seed=1)
    assert e.shape == (1, 1, ti.param_layout.n_params) and np.isfinite(e).all()
    # samples are decoded with the zoo statistics: far from the zoo only if the model is bad,
    # but always on the zoo's scale per position (mean within a few stds)
    z = (a.reshape(-1, a.shape[-1]) - ti.stats.mean) / ti.stats.std
    assert np.abs(z).mean() < 10
    with pytest.raises(DataError, match="prompts of shape"):
        generate_params(store, did, tid, prompts[:, :5], "ddim", 5)


def test_corrupt_token_shard_is_refused_naming_the_object(s3_store):
    srcs = small_sources(s3_store)
    zoo_id, _ = write_test_zoo(s3_store, srcs, seed=5)
    tid, _ = run_tokens(s3_store, TokensConfig(width=8, rows_per_shard=5), zoo_id)
    ti = load_tokens_info(s3_store, tid)
    path = s3_store.object_path(tid, ti.shards[1])
    data = bytearray(s3_store.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    s3_store.fs.pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError, match=f"{tid}/{ti.shards[1]}: checksum mismatch"):
        run_diffusion(s3_store, tiny_cfg(), tid)
    assert not s3_store.exists(diffusion_id_for(s3_store, tiny_cfg(), tid))


def test_a_checkpoint_that_does_not_fit_the_denoiser_is_recognised():
    from stgray.engines.diffusion import state_fits

    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)
    assert state_fits(a, torch.nn.Linear(3, 4).state_dict())
    assert not state_fits(a, b.state_dict())  # other shapes: the run starts over
    assert not state_fits(a, {"weight": a.weight.detach()})  # a tensor missing
