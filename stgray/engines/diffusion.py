"""GPDiff stage 3: train the diffusion denoiser on a ``tokens`` artifact with Ray Train
(input through Ray Data), and generate per-node parameters from prompts.

Training (``run_diffusion``): the token shards are checked against their manifest
(``store.verify``: a corrupt shard is refused naming the object), then read with
``ray.data.read_parquet(<shard paths>, filesystem=<store's pyarrow fs>)``, reduced to the
``tokens``/``prompt`` columns and handed to a ``TorchTrainer`` as its ``train`` dataset.
Each worker streams its split with ``iter_torch_batches`` (a local shuffle buffer, not the
whole zoo, in memory) and runs DDPM steps (``stgray.gpdiff.diffusion.train_step``) with an
EMA of the weights; data-parallel over workers (DDP) with ``batch_size`` the *global*
batch. Every ``checkpoint_every`` steps all ranks report and rank 0 attaches a checkpoint
(model, EMA, optimiser, noise generator, history) stored inside the store; a re-run with
the same artifact key resumes the same Ray run from its last checkpoint. Small token sets
(``cache``) are materialised once in Ray's object store (it spills to disk when full)
instead of being re-read from the store every epoch.

The artifact is keyed on the fields that change training only: sampler, sampling steps,
DDIM eta and device are left out (``training_config``), as are the execution settings
(workers, GPU, failures, checkpoint interval, caching). It holds the EMA denoiser weights
(``denoiser.pt``), the full config, the token layout, the loss history and tokens/s.

Generation (``generate_params``): prompts (M, D) -> parameters (M, S, P) decoded with the
tokens artifact's statistics (no clamping); sample s of node m uses its own generator
seeded by (seed, node key, s), so it does not depend on batching or on the other nodes.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
import torch

from stgray.config import content_hash
from stgray.engines import ray_utils
from stgray.engines.common import tensors_from_bytes, tensors_to_bytes
from stgray.engines.tokens import TOKENS_KIND, TokensInfo, load_tokens_info
from stgray.errors import ConfigError, DataError
from stgray.gpdiff.diffusion import (DiffusionConfig, build_denoiser, make_ema, make_optimizer,
                                     make_scheduler, resolve_device, sample, train_step)
from stgray.gpdiff.tokenizer import TokenLayout, Tokenizer
from stgray.nn.gpdiff.denoiser import GPDiffDenoiser

DIFFUSION_KIND = "diffusion"
#: DiffusionConfig fields that only matter when sampling (not part of the training key).
SAMPLING_FIELDS = frozenset({"sampler", "sampling_steps", "ddim_eta", "device"})
_COLUMNS = ("tokens", "prompt")


def training_config(cfg: DiffusionConfig) -> dict[str, Any]:
    """The config dict the training artifact is keyed on (sampling/device fields removed)."""
    return {k: v for k, v in cfg.hashed_dict().items() if k not in SAMPLING_FIELDS}


def diffusion_id_for(store, cfg: DiffusionConfig, tokens_id: str) -> str:
    return store.id_for(DIFFUSION_KIND, training_config(cfg), [tokens_id])


def _check_tokens(cfg: DiffusionConfig, info: TokensInfo) -> None:
    if info.width != cfg.token_width:
        raise ConfigError(f"token_width {cfg.token_width} but the tokens artifact has width "
                          f"{info.width}", field="token_width")
    if not math.isclose(info.config.stats_eps, cfg.stats_eps, rel_tol=1e-9):
        raise ConfigError(f"stats_eps {cfg.stats_eps} but the tokens artifact used "
                          f"{info.config.stats_eps}", field="stats_eps")
    if info.rows == 0:
        raise DataError("tokens artifact has no rows", where=info.id)


# ------------------------------------------------------------------------------------
# Ray Train worker
# ------------------------------------------------------------------------------------
def _state_file(d) -> Path:
    return Path(d) / "state.pt"


def state_fits(module: torch.nn.Module, state: dict) -> bool:
    """True when ``state`` has exactly ``module``'s tensors with their shapes."""
    own = module.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


def _diffusion_loop(c: dict[str, Any]) -> None:
    """Per-worker loop: DDP over ranks, each rank iterating its split of the dataset."""
    import ray.train
    import ray.train.torch

    cfg = DiffusionConfig.model_validate(c["cfg"])
    tl = TokenLayout.from_json(c["token_layout"])
    D, L, C = int(c["prompt_dim"]), tl.n_tokens, tl.width
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(c["threads"])))
    device = ray_utils.worker_device(None, c["use_gpu"])
    torch.manual_seed(cfg.seed)
    core = build_denoiser(cfg, tl, D).to(device)
    ema = make_ema(core, cfg.ema_decay)
    opt = make_optimizer(core, cfg)
    sched = make_scheduler(cfg)
    gen = torch.Generator().manual_seed(int(content_hash([cfg.seed, "noise", rank], 15), 16))
    step, epoch, history, rows_seen, seconds = 0, 0, [], 0, 0.0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(_state_file(d), map_location="cpu", weights_only=True)
        if not state_fits(core, st["model"]):  # e.g. written by other code under this run name
            if rank == 0:
                print("[diffusion] the run's checkpoint does not fit this denoiser: starting over",
                      flush=True)
            ckpt = None
    if ckpt:
        core.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        step, epoch, history = st["step"], st["epoch"], st["history"]
        if rank == 0:
            gen.set_state(st["gen"][0])
        else:  # only rank 0 checkpoints its generator: the others re-seed by step
            gen.manual_seed(int(content_hash([cfg.seed, "noise", rank, step], 15), 16))
        rows_seen, seconds = st["rows_seen"], st["seconds"]
    model = ray.train.torch.prepare_model(core) if world > 1 else core
    mask = tl.mask.to(device)
    bs = max(1, cfg.batch_size // world)
    shuffle = max(bs, int(c["shuffle_rows"])) if c["shuffle_rows"] else None
    every, log_every = int(c["checkpoint_every"]), int(c["log_every"])
    shard = ray.train.get_dataset_shard("train")
    collate = token_collate(device)
    win_loss, win_n, log_loss, log_n = 0.0, 0, 0.0, 0
    t_start, rows_start = time.perf_counter(), rows_seen

    def report(final: bool) -> None:
        nonlocal win_loss, win_n
        el = seconds + time.perf_counter() - t_start
        rate = (rows_seen - rows_start) * L * world / max(time.perf_counter() - t_start, 1e-9)
        rec = {"step": step, "loss": win_loss / max(win_n, 1), "tokens_per_s": rate,
               "seconds": el, "final": final, "resumed": bool(ckpt)}
        win_loss, win_n = 0.0, 0
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": core.state_dict(), "ema": ema.state_dict(),
                            "opt": opt.state_dict(), "step": step, "epoch": epoch,
                            "history": history, "gen": [gen.get_state()],
                            "rows_seen": rows_seen, "seconds": el,
                            "tokens_per_s": rate}, _state_file(d))
                ray.train.report(rec, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(rec)

    if step >= cfg.train_steps:  # nothing (left) to train: still hand back a checkpoint
        report(True)
        return
    while step < cfg.train_steps:
        got = 0
        for b in shard.iter_torch_batches(batch_size=bs, collate_fn=collate,
                                          local_shuffle_buffer_size=shuffle,
                                          local_shuffle_seed=int(content_hash(
                                              [cfg.seed, epoch, rank], 8), 16)):
            x0 = b["tokens"].reshape(-1, L, C)
            loss = train_step(model, ema, opt, x0, b["prompt"], mask, sched, cfg, generator=gen)
            step, got, rows_seen = step + 1, got + 1, rows_seen + x0.shape[0]
            win_loss, win_n = win_loss + loss, win_n + 1
            log_loss, log_n = log_loss + loss, log_n + 1
            if step % log_every == 0 or step == cfg.train_steps:
                history.append({"step": step, "loss": log_loss / log_n, "epoch": epoch})
                log_loss, log_n = 0.0, 0
            if step == cfg.train_steps:
                report(True)
                break
            if step % every == 0:
                report(False)
        if got == 0:
            raise RuntimeError(f"rank {rank} received no training rows (fewer rows than workers?)")
        epoch += 1


def _fixed_tensor(col) -> torch.Tensor:
    """A pyarrow ``fixed_size_list<float32>[n]`` column of R rows -> float32 (R, n),
    without copying when the column is one chunk."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    with warnings.catch_warnings():  # Arrow's buffers are read-only; the batch never writes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat.reshape(len(col), col.type.list_size)).float()


def token_collate(device=None):
    """The ``iter_torch_batches`` collate function for token shards: an Arrow batch ->
    ``{"tokens": (R, L*C), "prompt": (R, D)}`` float32 tensors on ``device``.

    Ray's default collation turns fixed-size-list columns into object arrays of rows and
    stacks them (a copy per row); this reads the Arrow buffers directly."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class TokenCollate(ArrowBatchCollateFn):
        def __call__(self, batch):
            out = {k: _fixed_tensor(batch.column(k)) for k in _COLUMNS}
            if device is not None and torch.device(device).type != "cpu":
                out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
            return out

    return TokenCollate()


# ------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------
def build_dataset(store, info: TokensInfo, cache: bool | Literal["auto"] = "auto",
                  cache_max_bytes: int = 512 << 20, block_bytes: int = 16 << 20):
    """The Ray Data dataset of a tokens artifact: its shards read from the store with the
    store's pyarrow filesystem, numeric columns only. ``cache``: materialise in Ray's
    object store (``"auto"``: when the shards total at most ``cache_max_bytes``).
    ``block_bytes``: read tasks of about this many stored bytes (at least one per shard)."""
    import ray.data

    fs, _ = store.arrow_fs()
    size = sum(info.manifest.files[n].size for n in info.shards)
    # Ray 2.60's default Parquet datasource (ListFiles -> ReadFiles) hands over nothing
    # until a whole file is read: 3-10x slower to the first batch in bench/token_pipeline.py.
    # With the legacy one, one read task per shard left the reader at 55-60% of a plain
    # pyarrow read (batch 256); ~16 MB tasks (split at row groups) and the column
    # projection inside the read brought it to about pyarrow's rate.
    ctx = ray.data.DataContext.get_current()
    old, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(list(info.shard_paths), filesystem=fs,
                                   columns=list(_COLUMNS),  # string columns (city, arch) cannot become tensors
                                   override_num_blocks=max(len(info.shards), -(-size // block_bytes)))
    finally:
        ctx.use_datasource_v2 = old
    if cache is True or (cache == "auto" and size <= cache_max_bytes):
        ds = ds.materialize()
    return ds


def run_diffusion(store, cfg: DiffusionConfig, tokens_id: str, num_workers: int = 1, *,
                  use_gpu: bool | Literal["auto"] = "auto", max_failures: int = 1,
                  checkpoint_every: int = 1000, log_every: int = 50, threads_per_worker: int = 1,
                  shuffle_rows: int | None = None, cache: bool | Literal["auto"] = "auto",
                  cache_max_bytes: int = 512 << 20, run_name: str | None = None,
                  info: dict | None = None) -> tuple[str, bool]:
    """Train the denoiser on ``tokens_id`` with Ray Train (idempotent, resumable).

    Returns ``(diffusion artifact id, skipped)``. Execution-only settings (not in the
    artifact key): ``num_workers`` (DDP workers; ``cfg.batch_size`` is the global batch),
    ``use_gpu``, ``max_failures``, ``checkpoint_every`` steps, ``log_every`` (loss
    history granularity), ``threads_per_worker``, ``shuffle_rows`` (local shuffle buffer
    per worker, default ``max(4 x batch, 256)`` rows), ``cache`` (see ``build_dataset``).
    ``info`` receives the Ray run name, tokens/s and timings.
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    info = info if info is not None else {}
    for name, v in (("num_workers", num_workers), ("checkpoint_every", checkpoint_every),
                    ("log_every", log_every), ("threads_per_worker", threads_per_worker)):
        if int(v) < 1:
            raise ConfigError(f"must be >= 1 (got {v})", field=name)
    tm = store.manifest(tokens_id)
    if tm.kind != TOKENS_KIND:
        raise DataError(f"artifact is a '{tm.kind}', not tokens", where=tokens_id)
    aid = diffusion_id_for(store, cfg, tokens_id)
    info["diffusion_id"] = aid
    if store.exists(aid):
        return aid, True
    tinfo = load_tokens_info(store, tokens_id)
    _check_tokens(cfg, tinfo)
    t0 = time.perf_counter()
    store.verify(tokens_id)  # IntegrityError "<tokens id>/<shard>: checksum mismatch ..."
    info["verify_seconds"] = time.perf_counter() - t0
    if num_workers > tinfo.rows:
        raise ConfigError(f"{num_workers} workers for {tinfo.rows} rows", field="num_workers")
    gpu = ray_utils.resolve_use_gpu(use_gpu)
    ds = build_dataset(store, tinfo, cache, cache_max_bytes)
    name = run_name or ray_utils.run_name("diffusion", aid)
    info["ray_run"] = name
    per_worker = max(1, cfg.batch_size // num_workers)
    res = {"CPU": threads_per_worker}
    if gpu:
        res["GPU"] = 1
    trainer = TorchTrainer(
        _diffusion_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"),
                           "token_layout": tinfo.token_layout.to_json(),
                           "prompt_dim": tinfo.prompt_dim, "use_gpu": gpu,
                           "threads": threads_per_worker, "checkpoint_every": checkpoint_every,
                           "log_every": log_every,
                           "shuffle_rows": shuffle_rows if shuffle_rows is not None
                           else max(4 * per_worker, 256)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                     resources_per_worker=res),
        run_config=ray_utils.run_config(store, name, max_failures=max_failures),
        datasets={"train": ds},
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    info["fit_seconds"] = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"diffusion training produced no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        st = torch.load(_state_file(d), map_location="cpu", weights_only=True)
    if st["step"] != cfg.train_steps:
        raise RuntimeError(f"last checkpoint is at step {st['step']} of {cfg.train_steps}")
    ema_state = _ema_weights(st["ema"])
    denoiser = build_denoiser(cfg, tinfo.token_layout, tinfo.prompt_dim)
    denoiser.load_state_dict(ema_state)  # checks the keys before anything is stored
    history = st["history"]
    meta = {"tokens_id": tokens_id, "prompt_dim": tinfo.prompt_dim, "L": tinfo.n_tokens,
            "C": tinfo.width, "P": tinfo.param_layout.n_params, "rows": tinfo.rows,
            "train_steps": cfg.train_steps,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens_per_s": st["tokens_per_s"], "train_seconds": st["seconds"],
            "denoiser_params": sum(p.numel() for p in denoiser.parameters()),
            "workers": num_workers, "ray_run": name}
    with store.writer(DIFFUSION_KIND, training_config(cfg), [tokens_id],
                      label=f"denoiser {cfg.conditioning} d{cfg.d_model}x{cfg.layers} "
                            f"{cfg.train_steps} steps", meta=meta) as w:
        w.put_bytes("denoiser.pt", tensors_to_bytes(ema_state))
        w.put_json("config.json", cfg.model_dump(mode="json"))
        w.put_bytes("token_layout.json", tinfo.token_layout.to_json().encode())
        w.put_json("history.json", history)
    info.update(tokens_per_s=st["tokens_per_s"], train_seconds=st["seconds"],
                final_loss=meta["final_loss"])
    return aid, False


def _ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The averaged denoiser's own state dict out of an ``AveragedModel`` state dict."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


# ------------------------------------------------------------------------------------
# loading and generation
# ------------------------------------------------------------------------------------
class Denoiser(NamedTuple):
    model: GPDiffDenoiser          # EMA weights, eval mode
    cfg: DiffusionConfig
    token_layout: TokenLayout
    prompt_dim: int
    tokens_id: str


def load_denoiser(store, diffusion_id: str, device: str | torch.device = "cpu") -> Denoiser:
    """The trained (EMA) denoiser of a ``diffusion`` artifact (checksummed, weights only)."""
    m = store.manifest(diffusion_id)
    if m.kind != DIFFUSION_KIND:
        raise DataError(f"artifact is a '{m.kind}', not a diffusion model", where=diffusion_id)
    cfg = DiffusionConfig.model_validate(store.read_json(diffusion_id, "config.json", m))
    tl = TokenLayout.from_json(store.read_bytes(diffusion_id, "token_layout.json", m))
    d = int(m.meta["prompt_dim"])
    model = build_denoiser(cfg, tl, d)
    state = tensors_from_bytes(store.read_bytes(diffusion_id, "denoiser.pt", m),
                               f"{diffusion_id}/denoiser.pt")
    model.load_state_dict(state)
    model.to(torch.device(device)).eval()
    return Denoiser(model, cfg, tl, d, m.meta["tokens_id"])


def sample_seed(seed: int, key: Any, s: int) -> int:
    """The generator seed of sample ``s`` of the node with key ``key``."""
    return int(content_hash([int(seed), key, int(s)], 15), 16)


def generate_params(store, diffusion_id: str, tokens_id: str | None, prompts,
                    sampler: Literal["ddpm", "ddim"] | None = None, steps: int | None = None,
                    samples_per_node: int = 1, seed: int = 0, *,
                    node_keys: Sequence[Any] | None = None, device: str = "cpu",
                    batch_size: int = 256, eta: float | None = None,
                    denoiser: Denoiser | None = None, info: dict | None = None) -> np.ndarray:
    """Sample parameters for M nodes: prompts (M, D) -> (M, S, P) float32, decoded with the
    tokens artifact's per-position statistics (never clamped).

    ``sampler``/``steps``/``eta`` default to the trained config's sampling settings.
    ``node_keys`` (M JSON-able keys, e.g. ``(city, node)``; default 0..M-1) seed each
    node's samples, so a node gets the same parameters whatever else is generated with
    it. ``tokens_id`` (default: the denoiser's) must be the artifact it was trained on.
    ``info`` receives ``sampling_seconds``, ``decode_seconds``, sampler and steps.
    """
    info = info if info is not None else {}
    den = denoiser or load_denoiser(store, diffusion_id, resolve_device(device))
    if tokens_id is not None and tokens_id != den.tokens_id:
        raise DataError(f"the denoiser was trained on {den.tokens_id}, not {tokens_id} "
                        "(its statistics decode the samples)", where=diffusion_id)
    tinfo = load_tokens_info(store, den.tokens_id)
    if tinfo.token_layout != den.token_layout:
        raise DataError("token layout differs from the denoiser's", where=den.tokens_id)
    pr = torch.as_tensor(np.asarray(prompts, dtype=np.float32))
    if pr.ndim != 2 or pr.shape[1] != den.prompt_dim:
        raise DataError(f"prompts of shape {tuple(pr.shape)}, want (M, {den.prompt_dim})",
                        where="generate")
    M, S = int(pr.shape[0]), int(samples_per_node)
    if S < 1:
        raise ConfigError("must be >= 1", field="samples_per_node")
    keys = list(range(M)) if node_keys is None else [k if isinstance(k, (int, str)) else list(k)
                                                      for k in node_keys]
    if len(keys) != M:
        raise DataError(f"{len(keys)} node keys for {M} prompts", where="generate")
    cfg = den.cfg
    sampler = sampler or cfg.sampler
    if steps is None:
        steps = cfg.sampling_steps if sampler == cfg.sampler and cfg.sampling_steps else \
            (cfg.num_train_timesteps if sampler == "ddpm" else 50)
    eta = cfg.ddim_eta if eta is None else eta
    dev = next(den.model.parameters()).device
    gens = [torch.Generator(device=dev).manual_seed(sample_seed(seed, k, s))
            for k in keys for s in range(S)]
    reps = pr.repeat_interleave(S, dim=0)
    sched = make_scheduler(cfg)
    t0 = time.perf_counter()
    toks = sample(den.model, reps, den.token_layout, sched, sampler, steps, gens, eta,
                  batch_size=batch_size) if M else \
        torch.zeros(0, den.token_layout.n_tokens, den.token_layout.width)
    info["sampling_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = Tokenizer(den.token_layout, tinfo.stats).decode(toks.cpu()).numpy()
    info["decode_seconds"] = time.perf_counter() - t0
    info.update(sampler=sampler, steps=int(steps), samples=M * S, eta=float(eta))
    return params.reshape(M, S, -1)


__all__ = ["DIFFUSION_KIND", "SAMPLING_FIELDS", "training_config", "diffusion_id_for",
           "build_dataset", "run_diffusion", "Denoiser", "load_denoiser", "generate_params",
           "sample_seed"]
