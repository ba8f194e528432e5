"""Ray Train plumbing shared by the engines: storage inside the artifact store, run names
derived from artifact keys, devices, scratch objects (mid-task checkpoints) in the store,
and the test-only fault hook.

Ray 2.60 runs Train V2 (see ../shared/docs/ray-notes.md): every rank must call
``ray.train.report`` equally often, and a run with the same name and storage path
resumes the old one -- which is what we want for a resubmitted job, so run names come
from the artifact key (the same work always resumes the same run).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

RAY_DIR = "_ray"  # inside the store root; not an artifact kind, so ``store.ls`` ignores it

# Credentials are never put into a Ray runtime environment (it is kept in the cluster's
# GCS and shown by the dashboard and `ray job list`). Workers open the store with what
# their node has: an instance profile / IRSA / workload identity, AWS config files, or
# AWS_* variables in the environment of the node's `ray start`. The store's endpoint
# travels with the pickled store (``StoreLocation.endpoint_url``). See docs/cluster.md.


def ray_storage(store) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: ``<root>/_ray`` of the store.

    S3 store: the bucket path without scheme plus a pyarrow ``S3FileSystem`` built by
    ``store.arrow_fs()`` (endpoint, region, retries); local store: a folder in the store.
    """
    if store.location.protocol == "file":
        path = os.path.join(store.location.root, RAY_DIR)
        os.makedirs(path, exist_ok=True)
        return path, None
    fs, root = store.arrow_fs()
    return f"{root}/{RAY_DIR}", fs


def run_name(prefix: str, artifact_id: str) -> str:
    """``<prefix>-<key>``: the same artifact resumes the same Ray Train run."""
    return f"{prefix}-{artifact_id.split('/', 1)[-1]}"


def run_config(store, name: str, *, max_failures: int = 0, **kwargs):
    """A ``ray.train.RunConfig`` storing Ray's run state inside ``store``. Nothing of the
    driver's environment is passed on to the workers (no credentials in runtime envs)."""
    import ray.train

    path, fs = ray_storage(store)
    return ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                               failure_config=ray.train.FailureConfig(max_failures=max_failures),
                               **kwargs)


# ------------------------------------------------------------------------------------
# scratch objects: mid-task state in the store, outside any artifact
# ------------------------------------------------------------------------------------
def scratch_path(store, *parts: str) -> str:
    """``<root>/_ray/<parts...>``: store-internal path (no scheme) of a scratch object."""
    for p in parts:
        if not p or "/" in p or p in (".", "..") or p.startswith("."):
            raise ValueError(f"bad scratch name part {p!r}")
    return "/".join([store.location.root, RAY_DIR, *parts])


def put_scratch(store, path: str, data: bytes) -> None:
    """Replace the scratch object at ``path`` whole: one PUT on S3 (atomic), write + rename
    on a local store, so a reader sees the old object or the new one, never a torn one."""
    fs = store.fs
    if store.location.protocol == "file":
        tmp = f"{path}.{os.getpid()}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        store._call(lambda: fs.pipe_file(path, data), path)


def get_scratch(store, path: str) -> bytes | None:
    """The scratch object's bytes, or None when there is none."""
    try:
        return store._call(lambda: store.fs.cat_file(path), path)
    except FileNotFoundError:
        return None


def rm_scratch(store, path: str) -> None:
    try:
        store._call(lambda: store.fs.rm(path), path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------
# test-only fault injection
# ------------------------------------------------------------------------------------
def inject_fault(fault: dict) -> None:
    """Test hook: die like a preempted worker (``mode="kill"``: SIGKILL, no cleanup) or fail
    with an exception (``mode="raise"``), once per ``fault["once_file"]`` (created when it
    fires, so the restarted worker runs on). Never called unless a test asks for it."""
    marker = Path(fault["once_file"])
    if marker.exists():
        return
    marker.touch()
    time.sleep(float(fault.get("delay_s", 0.0)))
    if fault.get("mode", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("injected fault")


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """``"auto"``: use GPUs when the Ray cluster (or, without Ray, this machine) has any."""
    if use_gpu != "auto":
        return bool(use_gpu)
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:
        pass
    import torch

    return torch.cuda.is_available()


def local_device(device: str | None, use_gpu: bool | str = "auto"):
    """The torch device for code running outside Ray Train (explicit ``device`` wins)."""
    import torch

    if device:
        return torch.device(device)
    if use_gpu is True or (use_gpu == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available():
            return torch.device("cuda")
    return torch.device("cpu")


def worker_device(device: str | None, use_gpu: bool):
    """The torch device inside a Ray Train worker."""
    import torch

    if device:
        return torch.device(device)
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")
