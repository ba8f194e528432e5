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


def run_config(store, run_name: str, max_failures: int = 0, keep: int = 2,
               worker_env: dict[str, str] | None = None):
    """A Ray Train ``RunConfig`` checkpointing into the store. The same ``run_name`` (derived
    from an artifact key) resumes an interrupted run (see ray-notes). ``worker_env``: extra
    environment variables of the worker processes, set before they start."""
    import ray.train

    path, fs = ray_storage(store)
    return ray.train.RunConfig(
        name=run_name, storage_path=path, storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        worker_runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
    )


#: jemalloc for training workers: freed pages are kept for the next step, never purged
#: (each step re-allocates the same activations; purged pages come back as page faults).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: OpenMP threads spin this many rounds (~50 us) before they sleep (see training_env).
TRAINING_SPINCOUNT = "2000"


def jemalloc_path() -> str | None:
    """Ray's bundled jemalloc (``ray/core/libjemalloc.so``, Linux wheels), found without
    importing ray; None where there is none."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    lib = Path(spec.origin).parent / "core" / "libjemalloc.so"
    return str(lib) if lib.is_file() else None


def training_env() -> dict[str, str]:
    """Environment for processes that only train, with as many torch threads as CPUs they own
    (Ray Train workers: Ray's CPU accounting keeps other tasks off those CPUs), set before the
    process starts (both are read at load time):

    - ``LD_PRELOAD`` of Ray's jemalloc with :data:`JEMALLOC_CONF`. glibc's heap fragments
      under a training step's mix of long- and short-lived activations: STGP pre-training at
      the reference sizes peaks at 1.35 GB with jemalloc and 1.85-1.90 GB with glibc (which
      grows for several steps after the first at 1.35-1.39), at the same speed. Purging freed
      pages (jemalloc's default decay, or glibc with a low mmap threshold) halves the speed:
      page faults cost ~1 s per GB here.
    - ``GOMP_SPINCOUNT``: with OMP_WAIT_POLICY=PASSIVE (stgray's default: spinning threads on
      shared cores waste time slices) every parallel region wakes sleeping threads. A short
      spin first makes 2-thread STGP pre-training steps 15-20% faster when the process has
      its CPUs to itself, and costs ~8% when two such processes share 2 cores (libgomp's
      default spin, 300k rounds: 2-5x slower there).

    ``STGRAY_JEMALLOC=0`` leaves the allocator alone; a ``GOMP_SPINCOUNT`` already set is
    kept."""
    env = {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", TRAINING_SPINCOUNT)}
    lib = jemalloc_path() if os.environ.get("STGRAY_JEMALLOC", "1") != "0" else None
    if lib and not os.environ.get("LD_PRELOAD"):
        env.update(LD_PRELOAD=lib, MALLOC_CONF=os.environ.get("MALLOC_CONF", JEMALLOC_CONF))
    return env


def allocator() -> str:
    """'jemalloc' when jemalloc is loaded in this process, else 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "system"
    except OSError:
        return "system"


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

