"""The pooled-source baseline of the benchmark: one per-node model (the zoo's architecture)
whose parameters are *shared* by every source node, trained on all source cities' windows
at once, then copied to every target node and fine-tuned per node on the target's train
days (like GPDiff few-shot, but from a pooled initialisation instead of a generated one).

The shared vector is kept at its best epoch on the sources' validation splits (mean
normalised MSE over cities); the target's validation split picks each node's fine-tuning
epoch. Nothing here reads a test split.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from stgray.config import content_hash
from stgray.data.prepare import Prepared
from stgray.engines import ray_utils
from stgray.engines.zoo import ZooConfig, _Program, node_seeds, scheduled_lr, set_lr
from stgray.errors import DataError
from stgray.nn.gpdiff.pernode import init_vectors, make_layout


def _nodes(p: Prepared, limit: int | None) -> np.ndarray:
    return np.arange(min(p.num_nodes, limit) if limit else p.num_nodes)


@torch.no_grad()
def _val_mse(progs, shared: dict, vals, batch: int) -> float:
    """Mean over cities of the normalised validation MSE of the shared model."""
    out = []
    for prog, va in zip(progs, vals):
        tot, n = 0.0, 0
        m = len(prog.order)
        for i in range(0, len(va), batch):
            s = torch.as_tensor(va[i:i + batch], device=prog.device)
            pred, y = prog.forward({k: v.expand(m, *v.shape[1:]) for k, v in shared.items()}, s, False)
            tot += float(((pred.float() - y) ** 2).sum())
            n += y.numel()
        out.append(tot / max(n, 1))
    return float(np.mean(out))


def train_pooled(sources: list[Prepared], cfg: ZooConfig, epochs: int | None = None, *,
                 device=None) -> tuple[np.ndarray, dict]:
    """One parameter vector (P,) float32 for ``cfg.model`` trained on the windows of every
    node (``cfg.node_limit`` first nodes per city) of every source city, Adam at ``cfg.lr``
    (decayed by ``cfg.lr_schedule``, as the zoo's models),
    batches of ``cfg.batch_size`` windows of one city at a time (cities interleaved).
    Returns the vector of the best source-validation epoch and an info dict."""
    t0 = time.perf_counter()
    arch = cfg.model
    layout = make_layout(arch)
    device = torch.device(device) if device is not None else ray_utils.local_device(cfg.device, cfg.use_gpu)
    epochs = cfg.epochs if epochs is None else int(epochs)
    if not sources:
        raise DataError("no source cities for the pooled model", where="pooled")
    progs = [_Program(p, _nodes(p, cfg.node_limit), arch, device, cfg.chunk_rows) for p in sources]
    trs = [p.window_starts("train", arch.t_in, arch.t_out) for p in sources]
    vals = [p.window_starts("val", arch.t_in, arch.t_out) for p in sources]
    init = init_vectors(arch, node_seeds(cfg.seed, "pooled", [0]))  # (1, P)
    shared = {k: v.clone().to(device).requires_grad_(True) for k, v in layout.unflatten(init).items()}
    opt = torch.optim.Adam(list(shared.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = np.random.default_rng(int(content_hash([cfg.seed, "pooled", [p.name for p in sources]], 15), 16))
    best = _val_mse(progs, shared, vals, cfg.eval_batch_size)
    best_vec, best_epoch, hist = layout.flatten({k: v.detach() for k, v in shared.items()})[0].clone(), 0, [best]
    steps_per_epoch = sum(-(-len(tr) // cfg.batch_size) for tr in trs)
    for ep in range(1, epochs + 1):
        perms = [tr[gen.permutation(len(tr))] for tr in trs]
        batches = [(c, perm[i:i + cfg.batch_size]) for c, perm in enumerate(perms)
                   for i in range(0, len(perm), cfg.batch_size)]
        for step, j in enumerate(gen.permutation(len(batches))):
            set_lr(opt, scheduled_lr(cfg, ep, step, epochs, steps_per_epoch))
            c, s = batches[j]
            prog, m = progs[c], len(progs[c].order)
            pred, y = prog.forward({k: v.expand(m, *v.shape[1:]) for k, v in shared.items()},
                                   torch.as_tensor(s, device=device), True)
            loss = ((pred.float() - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        v = _val_mse(progs, shared, vals, cfg.eval_batch_size)
        hist.append(v)
        if v < best:
            best, best_epoch = v, ep
            best_vec = layout.flatten({k: x.detach() for k, x in shared.items()})[0].clone()
    info = {"source_models": int(sum(len(p.order) for p in progs)), "epochs": epochs,
            "best_epoch": best_epoch, "val_mse_norm": hist, "seconds": time.perf_counter() - t0}
    return best_vec.cpu().numpy().astype(np.float32), info
