"""Ray Train plumbing shared by the engines: storage inside the artifact store, run names
derived from artifact keys, devices, and the environment workers need to reach S3.

Ray 2.60 runs Train V2 (see ../shared/docs/ray-notes.md): every rank must call
``ray.train.report`` equally often, and a run with the same name and storage path
resumes the old one -- which is what we want for a resubmitted job, so run names come
from the artifact key (the same work always resumes the same run).
"""

from __future__ import annotations

import os
from typing import Any

#: Variables forwarded to Ray Train workers of an S3 store when set on the driver. The
#: endpoint travels with the pickled store; credentials come from the environment only
#: (never from configs). On clusters whose nodes have their own credentials (instance
#: roles), set STGRAY_FORWARD_AWS_ENV=0.
_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
           "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "STGRAY_S3_ENDPOINT", "AWS_PROFILE",
           "AWS_EC2_METADATA_DISABLED", "AWS_CA_BUNDLE")

RAY_DIR = "_ray"  # inside the store root; not an artifact kind, so ``store.ls`` ignores it


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


def worker_env(store) -> dict[str, str]:
    """Environment variables Ray workers need to open ``store`` (S3 credentials/endpoint)."""
    if store.location.protocol == "file" or os.environ.get("STGRAY_FORWARD_AWS_ENV", "1") == "0":
        return {}
    return {k: os.environ[k] for k in _S3_ENV if os.environ.get(k)}


def run_name(prefix: str, artifact_id: str) -> str:
    """``<prefix>-<key>``: the same artifact resumes the same Ray Train run."""
    return f"{prefix}-{artifact_id.split('/', 1)[-1]}"


def run_config(store, name: str, *, max_failures: int = 0, **kwargs):
    """A ``ray.train.RunConfig`` storing Ray's run state inside ``store``."""
    import ray.train

    path, fs = ray_storage(store)
    env = worker_env(store)
    extra = dict(kwargs)
    if env:
        rt = dict(extra.pop("worker_runtime_env", None) or {})
        rt["env_vars"] = {**env, **rt.get("env_vars", {})}
        extra["worker_runtime_env"] = rt
    return ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                               failure_config=ray.train.FailureConfig(max_failures=max_failures),
                               **extra)


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
