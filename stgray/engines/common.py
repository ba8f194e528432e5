"""Pieces every engine uses: safe tensor (de)serialisation, Ray start-up, and Ray Train run
and scaling configs built on ``ray_utils`` (storage inside the store, GPU resolution)."""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from stgray.engines.ray_utils import ray_storage, resolve_use_gpu
from stgray.errors import ConfigError, IntegrityError


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; refuses cuda when there is none. (Here, not beside
    the diffusion code: STGP processes then never import diffusers, ~90 MB resident.)"""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device '{spec}'", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA requested but not available", field="device")
    return dev


def keep_freed_memory(threshold_bytes: int = 32 << 20) -> bool:
    """Ask glibc's malloc to serve blocks up to ``threshold_bytes`` from its heap and keep
    freed memory instead of returning it to the OS. Training steps free and re-allocate
    the same large activations every step; by default each comes back as fresh mmap'd pages
    that the kernel zeroes on first touch (STGP pre-training at the reference sizes: ~20k
    page faults per step). Same effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    set before start-up. False (nothing changed) off glibc."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(libc.mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, threshold_bytes),
                                                    (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (Linux's ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def amp_enabled(device: torch.device, requested: bool = True) -> bool:
    """Mixed precision only on GPU."""
    return bool(requested) and device.type == "cuda"


def tensors_to_bytes(tensors: dict[str, Any]) -> bytes:
    """Serialise a (nested) dict of tensors/numbers/strings with torch.save (no code objects)."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def tensors_from_bytes(data: bytes, where: str = "object") -> dict[str, Any]:
    """Inverse of ``tensors_to_bytes``; never unpickles arbitrary objects (weights_only)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or not a tensor file
        raise IntegrityError(f"cannot load tensors ({type(e).__name__})", where=where) from None


def run_config(store, run_name: str, max_failures: int = 0, keep: int = 2):
    """A Ray Train ``RunConfig`` checkpointing into the store. The same ``run_name`` (derived
    from an artifact key) resumes an interrupted run (see ray-notes)."""
    import ray.train

    path, fs = ray_storage(store)
    return ray.train.RunConfig(
        name=run_name, storage_path=path, storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
    )


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS) or start a local Ray if none is running."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, log_to_driver=True)
    else:
        ncpu = num_cpus or max(3, os.cpu_count() or 1)  # > cores: avoids the 2-CPU Tune/Train deadlock
        ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=True,
                 _temp_dir=os.environ.get("STGRAY_RAY_TMP", "/tmp/ray"),
                 runtime_env={"worker_process_setup_hook": quiet_train_cleaner})


def quiet_train_cleaner() -> None:
    """Ray worker set-up for a Ray started without its dashboard: the State API is then not
    served, and Ray Train's placement-group cleaner warns that it cannot query the
    controller about once a second for the whole run. Keep its errors only."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def scaling(num_workers: int, use_gpu: str | bool = "auto", placement_strategy: str = "PACK",
            cpus_per_worker: int = 1):
    """Ray Train scaling: ``use_gpu="auto"`` uses GPUs when the cluster has any."""
    import ray.train

    gpu = resolve_use_gpu(use_gpu)
    res = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return ray.train.ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=res,
                                   placement_strategy=placement_strategy)

