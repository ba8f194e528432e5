"""The cluster configs users deploy with: checked without any cloud, Kubernetes or Ray cluster.

* cluster/aws.yaml, cluster/gcp.yaml: ray's own JSON schema (ray/autoscaler/ray-schema.json)
  and ray's own ``prepare_config`` + ``validate_config``; then what the schema cannot say:
  CPU-only head, GPU types scaling from 0, spot and on-demand GPU types, idle timeout,
  images and pins equal to ray 2.60.0 / py311 / the lock file, token auth, an s3:// store.
* cluster/kuberay/*.yaml: RayCluster / RayJob fields KubeRay needs, GPU groups from 0,
  nvidia.com/gpu limits, S3 keys only through secretKeyRef, the RayJob's cluster spec
  identical to the RayCluster's.
* jobs/runtime_env.yaml: no secrets, no pip, excludes that ray's own packaging honours.
* Dockerfile: the same pins.
* No literal secret (AWS keys, HMAC ids, private keys, tokens) in any of these files.

Every check is a function returning a list of problems; the tests assert the real files
have none and that deliberately broken copies are caught.
"""

from __future__ import annotations

import copy
import json
import re
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_VERSION = "2.60.0"
PY_TAG = "py311"  # the project's Python (3.11), in rayproject/ray tag form
LAUNCHERS = {"aws": REPO / "cluster" / "aws.yaml", "gcp": REPO / "cluster" / "gcp.yaml"}
KUBERAY = REPO / "cluster" / "kuberay"
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
DOCKERFILE = REPO / "Dockerfile"
QUICKSTART_ENTRYPOINT = "python -m jobs.pipeline configs/quickstart.yaml"

# Names of environment variables whose value is a secret: never a literal anywhere.
SECRET_NAME = re.compile(
    r"(SECRET|PASSWORD|ACCESS_KEY|SESSION_TOKEN|AUTH_TOKEN$|API_KEY|PRIVATE_KEY)", re.I)
RAYPROJECT_IMAGE = re.compile(
    r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-(?P<platform>cpu|gpu|cu\d+)$")
PROJECT_IMAGE = re.compile(
    r"^(?:[\w.-]+(?::\d+)?/)*stgray:ray(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-(?P<platform>cpu|gpu|cu\d+)$")
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([0-9][^\s'\";,)]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[_norm(name.split("[", 1)[0])] = ver.strip()
    return pins


def pin_problems(text: str, where: str) -> list[str]:
    """Every ``name==version`` in ``text`` must be the lock file's version of ``name``."""
    lock = lock_pins()
    out = []
    for name, ver in PIN.findall(text):
        n = _norm(name)
        if n not in lock:
            out.append(f"{where}: {name}=={ver} is not in requirements-lock.txt")
        elif lock[n] != ver:
            out.append(f"{where}: {name}=={ver} but the lock has {lock[n]}")
    return out


def image_problems(image: str, want_platform: str, where: str) -> list[str]:
    """``want_platform``: "cpu" or "gpu" (gpu accepts a cuXYZ tag too)."""
    m = RAYPROJECT_IMAGE.match(image) or PROJECT_IMAGE.match(image)
    if not m:
        return [f"{where}: image {image!r} is neither rayproject/ray:<ver>-<py>-<platform> "
                "nor <registry>/stgray:ray<ver>-<py>-<platform>"]
    out = []
    if m["ray"] != RAY_VERSION:
        out.append(f"{where}: image {image} has ray {m['ray']}, the project pins {RAY_VERSION}")
    if m["py"] != PY_TAG:
        out.append(f"{where}: image {image} is {m['py']}, the project is {PY_TAG}")
    is_gpu = m["platform"] != "cpu"
    if is_gpu != (want_platform == "gpu"):
        out.append(f"{where}: image {image} is {m['platform']}, this node needs {want_platform}")
    return out


# --------------------------------------------------------------------------- secrets

_SECRET_PATTERNS = [
    ("AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")),
    ("GCS HMAC access id", re.compile(r"(?<![A-Z0-9])GOOG[A-Z0-9]{20,}")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("GitHub token", re.compile(r"gh[pousr]_[A-Za-z0-9]{36}")),
    ("64-hex token", re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{64}(?![0-9a-fA-F])")),
]
# key = value / key: value with a secret-looking key and a literal value. Placeholders
# (<...>, ${...}, $VAR, "...") and references are fine.
_SECRET_ASSIGN = re.compile(
    r"(?im)^[^\n#]*?\b(aws_secret_access_key|aws_access_key_id|aws_session_token|"
    r"secret_key|access_key|password|auth_token|token)\b[ \t]*[:=][ \t]*[\"']?([^\s\"'#]+)")
_PLACEHOLDER = re.compile(r"^(<.*>|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\.\.\.|\"\"|''|\{\}|null|~)$")


def _looks_like_aws_secret(tok: str) -> bool:
    return (len(tok) == 40 and re.fullmatch(r"[A-Za-z0-9/+]{40}", tok) is not None
            and any(c.isupper() for c in tok) and any(c.islower() for c in tok)
            and any(c.isdigit() for c in tok))


def secret_problems(text: str, where: str) -> list[str]:
    out = []
    for what, pat in _SECRET_PATTERNS:
        for m in pat.finditer(text):
            out.append(f"{where}: looks like a literal {what}: {m.group(0)[:12]}...")
    for tok in re.findall(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])", text):
        if _looks_like_aws_secret(tok):
            out.append(f"{where}: looks like a literal AWS secret key: {tok[:6]}...")
    for m in _SECRET_ASSIGN.finditer(text):
        value = m.group(2)
        if value.endswith(("_PATH", "_FILE")) or value.startswith(("/", "~", "$")):
            continue  # a path or a reference, not the secret
        if not _PLACEHOLDER.match(value) and not value.startswith("<"):
            out.append(f"{where}: literal value for {m.group(1)}: {value[:4]}...")
    return out


def secret_env_problems(env: dict, where: str) -> list[str]:
    """Literal values of secret-looking environment variable names."""
    return [f"{where}: {k} is set to a literal value" for k in env if SECRET_NAME.search(k)]


# ------------------------------------------------------------------------ launcher

def _docker_env(cfg: dict) -> dict[str, str]:
    env = {}
    for opt in cfg.get("docker", {}).get("run_options", []):
        m = re.match(r"^(?:--env|-e)[ =](\w+)=(.*)$", opt.strip())
        if m:
            env[m.group(1)] = m.group(2).strip()
    return env


def _vcpus(machine_type: str) -> int | None:
    m = re.match(r"^[a-z]\d+[a-z]?-(?:standard|highmem|highcpu)-(\d+)$", machine_type)
    return int(m.group(1)) if m else None


# GPUs that come with a machine type (no guestAccelerators entry on GCP).
_GCP_BUILTIN_GPUS = {"g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1,
                     "g2-standard-16": 1, "g2-standard-24": 2, "g2-standard-32": 1,
                     "g2-standard-48": 4, "g2-standard-96": 8, "a2-highgpu-1g": 1,
                     "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8}


def node_gpus(provider: str, node_config: dict) -> int:
    """GPUs of a node type as the cloud sees it (0 for CPU machines)."""
    if provider == "aws":
        it = node_config.get("InstanceType", "")
        if re.match(r"^(g\d|p\d)", it):
            return {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
                    "g6.xlarge": 1, "g6.12xlarge": 4, "p4d.24xlarge": 8}.get(it, 1)
        return 0
    acc = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators", []))
    return acc or _GCP_BUILTIN_GPUS.get(node_config.get("machineType", ""), 0)


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    sched = node_config.get("scheduling", {})
    return sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True


def launcher_problems(cfg: dict, provider: str) -> list[str]:
    out = []
    if cfg.get("provider", {}).get("type") != provider:
        out.append(f"provider.type is not {provider}")
    idle = cfg.get("idle_timeout_minutes")
    if not isinstance(idle, (int, float)) or not 0 < idle <= 60:
        out.append(f"idle_timeout_minutes must be set, in (0, 60]: {idle!r}")
    if not isinstance(cfg.get("upscaling_speed"), (int, float)) or cfg["upscaling_speed"] <= 0:
        out.append("upscaling_speed must be set and > 0")
    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    if head not in types:
        return out + [f"head_node_type {head!r} is not a node type"]
    max_workers = cfg.get("max_workers")
    if not isinstance(max_workers, int) or max_workers < 1:
        out.append(f"max_workers must be a positive int: {max_workers!r}")

    docker = cfg.get("docker", {})
    if not docker.get("container_name"):
        out.append("docker.container_name is empty (ray would run on the host)")
    head_image = docker.get("head_image", docker.get("image", ""))
    out += image_problems(head_image, "cpu", "docker.head_image")
    out += image_problems(docker.get("image", ""), "cpu", "docker.image")

    h = types[head]
    if h.get("resources", {}).get("CPU") != 0:
        out.append("head node type must advertise resources {CPU: 0} (no tasks on the head)")
    if node_gpus(provider, h["node_config"]):
        out.append("head node type is a GPU machine")

    gpu_types, cpu_workers = [], []
    for name, nt in types.items():
        if name == head:
            continue
        gpus = node_gpus(provider, nt["node_config"])
        if ("gpu" in name.lower()) != bool(gpus):
            out.append(f"{name}: name and machine disagree about GPUs ({gpus} GPUs)")
        if nt.get("min_workers", 0) < 0 or nt.get("max_workers", 0) < nt.get("min_workers", 0):
            out.append(f"{name}: min_workers/max_workers inconsistent")
        if isinstance(max_workers, int) and nt.get("max_workers", 0) > max_workers:
            out.append(f"{name}: max_workers above the cluster's max_workers")
        image = nt.get("docker", {}).get("worker_image", docker.get("worker_image",
                                                                    docker.get("image", "")))
        if gpus:
            gpu_types.append((name, nt))
            if nt.get("min_workers", 0) != 0:
                out.append(f"{name}: GPU node type must scale from zero (min_workers: 0), "
                           f"has {nt.get('min_workers')}")
            out += image_problems(image, "gpu", f"{name}.docker.worker_image")
        else:
            cpu_workers.append(name)
            out += image_problems(image, "cpu", f"{name}.docker.worker_image")
        if provider == "gcp":
            res = nt.get("resources", {})
            if res.get("GPU", 0) != gpus:
                out.append(f"{name}: resources GPU={res.get('GPU', 0)} but the machine has {gpus}")
            vcpus = _vcpus(nt["node_config"].get("machineType", ""))
            if vcpus is not None and res.get("CPU") != vcpus:
                out.append(f"{name}: resources CPU={res.get('CPU')} but the machine has {vcpus}")
            if gpus and nt["node_config"].get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
                out.append(f"{name}: GPU VMs need scheduling.onHostMaintenance: TERMINATE")
        if provider == "aws" and "IamInstanceProfile" not in nt["node_config"]:
            out.append(f"{name}: no IamInstanceProfile (S3 access must come from the instance role)")
    if not gpu_types:
        out.append("no GPU worker type")
    if not any(_is_spot(provider, nt["node_config"]) for _, nt in gpu_types):
        out.append("no spot/preemptible GPU worker type")
    if not any(not _is_spot(provider, nt["node_config"]) for _, nt in gpu_types):
        out.append("no on-demand GPU worker type")
    if not any(not _is_spot(provider, types[n]["node_config"]) for n in cpu_workers):
        out.append("no on-demand CPU worker type")
    if provider == "aws" and "IamInstanceProfile" not in h["node_config"]:
        out.append("head: no IamInstanceProfile")

    env = _docker_env(cfg)
    if env.get("RAY_AUTH_MODE") != "token":
        out.append("nodes must run with RAY_AUTH_MODE=token")
    if not env.get("STGRAY_STORE", "").startswith("s3://"):
        out.append(f"STGRAY_STORE on the nodes must be an s3:// URL: {env.get('STGRAY_STORE')!r}")
    out += secret_env_problems(env, "docker.run_options")
    mounts = cfg.get("file_mounts", {})
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    if not any(token_path.startswith(r.replace("~", "/home/ray", 1).rstrip("/") + "/")
               for r in mounts):
        out.append(f"RAY_AUTH_TOKEN_PATH {token_path!r} is not inside a file mount")
    if provider == "gcp":
        if not env.get("STGRAY_S3_ENDPOINT", "").startswith("https://"):
            out.append("gcp: STGRAY_S3_ENDPOINT (S3 interop endpoint) must be set")
        cred = env.get("AWS_SHARED_CREDENTIALS_FILE", "")
        if not any(cred.startswith(r.replace("~", "/home/ray", 1).rstrip("/") + "/") for r in mounts):
            out.append("gcp: AWS_SHARED_CREDENTIALS_FILE must be inside a file mount")

    for remote, local in mounts.items():
        if not local.startswith("~") and not (REPO / local).exists():
            out.append(f"file_mounts: local path {local} does not exist in the repository")
    if mounts.get("~/stgray-src/requirements-lock.txt") != "./requirements-lock.txt":
        out.append("file_mounts must ship requirements-lock.txt to the nodes")

    setup = "\n".join(cfg.get("setup_commands", []))
    if "-r ~/stgray-src/requirements-lock.txt" not in setup:
        out.append("setup_commands must install the lock file")
    if f"ray.__version__ == '{RAY_VERSION}'" not in setup:
        out.append(f"setup_commands must check ray == {RAY_VERSION}")
    all_cmds = "\n".join(str(c) for k in ("setup_commands", "head_setup_commands",
                                          "worker_setup_commands", "initialization_commands")
                         for c in cfg.get(k, []))
    out += pin_problems(all_cmds, "setup commands")
    return out


@pytest.fixture(scope="module")
def ray_schema():
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("provider", sorted(LAUNCHERS))
def test_launcher_config_valid_for_ray(provider, ray_schema):
    """The file as written passes ray's JSON schema, and ray's own prepare/validate."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(LAUNCHERS[provider])
    jsonschema.validate(cfg, ray_schema)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


@pytest.mark.parametrize("provider", sorted(LAUNCHERS))
def test_schema_rejects_a_typo(provider, ray_schema):
    import jsonschema

    cfg = _load(LAUNCHERS[provider])
    cfg["available_node_types"]["head"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)
    cfg = _load(LAUNCHERS[provider])
    cfg["idle_timeout_minutes"] = "10"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)


@pytest.mark.parametrize("provider", sorted(LAUNCHERS))
def test_launcher_config_content(provider):
    assert launcher_problems(_load(LAUNCHERS[provider]), provider) == []


def test_launcher_checks_catch_mistakes():
    base = _load(LAUNCHERS["aws"])

    def problems(mutate):
        cfg = copy.deepcopy(base)
        mutate(cfg)
        return "\n".join(launcher_problems(cfg, "aws"))

    gpu = "gpu_spot_1xA10G"
    assert "must scale from zero" in problems(
        lambda c: c["available_node_types"][gpu].__setitem__("min_workers", 1))
    assert "idle_timeout_minutes" in problems(lambda c: c.pop("idle_timeout_minutes"))
    assert "has ray 2.59.0" in problems(
        lambda c: c["available_node_types"][gpu]["docker"].__setitem__(
            "worker_image", "rayproject/ray:2.59.0-py311-gpu"))
    assert "this node needs gpu" in problems(
        lambda c: c["available_node_types"][gpu]["docker"].__setitem__(
            "worker_image", "rayproject/ray:2.60.0-py311-cpu"))
    assert "is py310" in problems(
        lambda c: c["docker"].__setitem__("image", "rayproject/ray:2.60.0-py310-cpu"))
    assert "{CPU: 0}" in problems(
        lambda c: c["available_node_types"]["head"].__setitem__("resources", {}))
    assert "no spot" in problems(
        lambda c: c["available_node_types"][gpu]["node_config"].pop("InstanceMarketOptions"))
    assert "RAY_AUTH_MODE=token" in problems(
        lambda c: c["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token"))
    assert "AWS_SECRET_ACCESS_KEY is set to a literal" in problems(
        lambda c: c["docker"]["run_options"].append("--env AWS_SECRET_ACCESS_KEY=x"))
    assert "but the lock has" in problems(
        lambda c: c["setup_commands"].append("pip install torch==2.12.0"))
    assert "s3:// URL" in problems(
        lambda c: c["docker"]["run_options"].__setitem__(
            3, "--env STGRAY_STORE=./stgray-store"))

    gcp = _load(LAUNCHERS["gcp"])
    gcp["available_node_types"]["gpu_spot_1xT4"]["resources"]["GPU"] = 2
    assert any("resources GPU=2" in p for p in launcher_problems(gcp, "gcp"))


# ------------------------------------------------------------------------- KubeRay

def _ray_containers(spec: dict):
    """(where, container, is_gpu_group) for the head and every worker group."""
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", c, False
    for g in spec.get("workerGroupSpecs", []):
        for c in g["template"]["spec"]["containers"]:
            gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            yield g.get("groupName", "?"), c, gpu


def raycluster_spec_problems(spec: dict) -> list[str]:
    out = []
    if str(spec.get("rayVersion")) != RAY_VERSION:
        out.append(f"rayVersion is {spec.get('rayVersion')!r}, the project pins {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        out.append("enableInTreeAutoscaling must be true (GPU groups scale from zero)")
    idle = spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds")
    if not isinstance(idle, int) or idle <= 0:
        out.append(f"autoscalerOptions.idleTimeoutSeconds must be a positive int: {idle!r}")
    if spec.get("authOptions", {}).get("mode") != "token":
        out.append("authOptions.mode must be token")
    head = spec.get("headGroupSpec")
    if not head:
        return out + ["no headGroupSpec"]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        out.append('headGroupSpec.rayStartParams must have num-cpus: "0"')
    groups = spec.get("workerGroupSpecs") or []
    if len({g.get("groupName") for g in groups}) != len(groups):
        out.append("workerGroupSpecs: groupName not unique")
    n_gpu = n_cpu = 0
    for g in groups:
        name = g.get("groupName", "?")
        lo, n, hi = g.get("minReplicas"), g.get("replicas", 0), g.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and lo <= n <= hi and hi > 0):
            out.append(f"{name}: need minReplicas <= replicas <= maxReplicas, maxReplicas > 0")
        cs = g["template"]["spec"]["containers"]
        gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in cs)
        if gpu:
            n_gpu += 1
            if lo != 0 or n != 0:
                out.append(f"{name}: GPU group must scale from zero (minReplicas: 0, replicas: 0)")
            tol = g["template"]["spec"].get("tolerations", [])
            if not any(t.get("key") == "nvidia.com/gpu" for t in tol):
                out.append(f"{name}: GPU group without a nvidia.com/gpu toleration")
        else:
            n_cpu += 1
    if not n_gpu:
        out.append("no GPU worker group (nvidia.com/gpu limit)")
    if not n_cpu:
        out.append("no CPU worker group")
    for where, c, gpu in _ray_containers(spec):
        out += image_problems(c.get("image", ""), "gpu" if gpu else "cpu", f"{where}.image")
        res = c.get("resources", {})
        if gpu:
            lim = str(res.get("limits", {}).get("nvidia.com/gpu"))
            if not lim.isdigit() or int(lim) < 1:
                out.append(f"{where}: nvidia.com/gpu limit must be a positive integer")
            if str(res.get("requests", {}).get("nvidia.com/gpu", lim)) != lim:
                out.append(f"{where}: nvidia.com/gpu request != limit")
        elif "nvidia.com/gpu" in res.get("limits", {}) or "nvidia.com/gpu" in res.get("requests", {}):
            out.append(f"{where}: GPU resource on a CPU container")
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
            if not ref.get("name") or ref.get("key") != key:
                out.append(f"{where}: {key} must come from a Secret (valueFrom.secretKeyRef)")
        for name, e in env.items():
            if SECRET_NAME.search(name) and ("value" in e or "secretKeyRef" not in e.get("valueFrom", {})):
                out.append(f"{where}: {name} must be a secretKeyRef, not a literal value")
        if not any(f.get("configMapRef", {}).get("name") == "stgray-env" for f in c.get("envFrom", [])):
            out.append(f"{where}: envFrom configMapRef stgray-env missing")
        if not any(m.get("mountPath") == "/dev/shm" for m in c.get("volumeMounts", [])):
            out.append(f"{where}: no /dev/shm volume (object store, DataLoader workers)")
    return out


def raycluster_problems(doc: dict) -> list[str]:
    out = []
    if doc.get("apiVersion") != "ray.io/v1":
        out.append(f"apiVersion is {doc.get('apiVersion')!r}, want ray.io/v1")
    if doc.get("kind") != "RayCluster":
        out.append(f"kind is {doc.get('kind')!r}")
    return out + raycluster_spec_problems(doc.get("spec", {}))


def rayjob_problems(doc: dict, cluster_spec: dict, runtime_env: dict) -> list[str]:
    out = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        out.append("want apiVersion ray.io/v1, kind RayJob")
    spec = doc.get("spec", {})
    if spec.get("entrypoint") != QUICKSTART_ENTRYPOINT:
        out.append(f"entrypoint is {spec.get('entrypoint')!r}")
    if spec.get("shutdownAfterJobFinishes") is not True:
        out.append("shutdownAfterJobFinishes must be true")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl <= 0:
        out.append(f"ttlSecondsAfterFinished must be a positive int: {ttl!r}")
    if spec.get("rayClusterSpec") != cluster_spec:
        out.append("rayClusterSpec differs from raycluster.yaml's spec")
    out += raycluster_spec_problems(spec.get("rayClusterSpec", {}))
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError as e:
        return out + [f"runtimeEnvYAML is not YAML: {e}"]
    if not isinstance(env, dict):
        return out + ["runtimeEnvYAML is not a mapping"]
    if env.get("working_dir") != dockerfile_workdir():
        out.append(f"runtimeEnvYAML working_dir {env.get('working_dir')!r} is not the image's "
                   f"checkout {dockerfile_workdir()!r}")
    missing = set(runtime_env.get("excludes", [])) - set(env.get("excludes", []))
    if missing:
        out.append(f"runtimeEnvYAML lacks excludes of jobs/runtime_env.yaml: {sorted(missing)}")
    if env.get("env_vars") != runtime_env.get("env_vars"):
        out.append("runtimeEnvYAML env_vars differ from jobs/runtime_env.yaml")
    out += runtime_env_problems(env, require_excludes=False)
    return out


def test_kuberay_raycluster():
    assert raycluster_problems(_load(KUBERAY / "raycluster.yaml")) == []


def test_kuberay_rayjob_runs_quickstart_on_the_same_cluster():
    cluster = _load(KUBERAY / "raycluster.yaml")
    job = _load(KUBERAY / "rayjob.yaml")
    assert rayjob_problems(job, cluster["spec"], _load(RUNTIME_ENV)) == []


def test_kuberay_configmap_holds_no_secrets():
    cm = _load(KUBERAY / "stgray-env.yaml")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "stgray-env"
    assert cm["data"]["STGRAY_STORE"].startswith("s3://")
    assert secret_env_problems(cm["data"], "stgray-env") == []


def test_kuberay_checks_catch_mistakes():
    cluster = _load(KUBERAY / "raycluster.yaml")
    job = _load(KUBERAY / "rayjob.yaml")
    renv = _load(RUNTIME_ENV)

    def problems(mutate):
        doc = copy.deepcopy(cluster)
        mutate(doc["spec"])
        return "\n".join(raycluster_problems(doc))

    gpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-1x")
    i = cluster["spec"]["workerGroupSpecs"].index(gpu_group)
    assert "scale from zero" in problems(lambda s: s["workerGroupSpecs"][i].__setitem__("minReplicas", 1))
    assert "rayVersion" in problems(lambda s: s.__setitem__("rayVersion", "2.59.0"))
    assert "enableInTreeAutoscaling" in problems(lambda s: s.pop("enableInTreeAutoscaling"))

    def literal_secret(s):
        env = s["workerGroupSpecs"][i]["template"]["spec"]["containers"][0]["env"]
        env[1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}

    assert "must come from a Secret" in problems(literal_secret)
    assert "no GPU worker group" in problems(
        lambda s: [g["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
                   for g in s["workerGroupSpecs"] if g["groupName"].startswith("gpu")])

    drifted = copy.deepcopy(job)
    drifted["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = 99
    assert any("differs" in p for p in rayjob_problems(drifted, cluster["spec"], renv))
    drifted = copy.deepcopy(job)
    drifted["spec"]["runtimeEnvYAML"] += "  AWS_SECRET_ACCESS_KEY: x\n"
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in rayjob_problems(drifted, cluster["spec"], renv))


# ---------------------------------------------------------------------- runtime env

REQUIRED_EXCLUDES = {".git", ".venv", "stgray-store", "bench/results", "*.parquet", ".stgray"}
ALLOWED_RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "config", "py_modules"}


def runtime_env_problems(env: dict, require_excludes: bool = True) -> list[str]:
    out = []
    extra = set(env) - ALLOWED_RUNTIME_ENV_KEYS
    if extra:
        out.append(f"unexpected runtime_env keys {sorted(extra)} (deps come from the image, "
                   "not pip/conda/uv at job start)")
    env_vars = env.get("env_vars") or {}
    out += secret_env_problems(env_vars, "runtime_env.env_vars")
    for k in env_vars:
        if k.startswith("AWS_") or k in ("RAY_AUTH_MODE", "STGRAY_STORE", "STGRAY_S3_ENDPOINT"):
            out.append(f"runtime_env.env_vars: {k} belongs to the nodes' environment")
    if require_excludes:
        missing = REQUIRED_EXCLUDES - set(env.get("excludes") or [])
        if missing:
            out.append(f"runtime_env.excludes lacks {sorted(missing)}")
    return out


def test_runtime_env_content():
    env = _load(RUNTIME_ENV)
    assert runtime_env_problems(env) == []
    assert env["env_vars"] == {"TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_runtime_env_checks_catch_mistakes():
    env = _load(RUNTIME_ENV)
    bad = dict(env, pip=["torch"])
    assert any("unexpected runtime_env keys" in p for p in runtime_env_problems(bad))
    bad = dict(env, env_vars={"AWS_SECRET_ACCESS_KEY": "x"})
    assert any("literal value" in p for p in runtime_env_problems(bad))
    bad = dict(env, excludes=[e for e in env["excludes"] if e != ".venv"])
    assert any(".venv" in p for p in runtime_env_problems(bad))


def test_runtime_env_excludes_as_ray_applies_them():
    """Ray's own matcher (gitwildmatch, relative to the working dir) on sample paths."""
    from ray._private.runtime_env.packaging import _get_excludes

    match = _get_excludes(REPO, _load(RUNTIME_ENV)["excludes"])
    for p in [".venv/lib/python3.11/site-packages/ray/__init__.py", ".git/HEAD",
              "stgray-store/city/abc/series.parquet", "bench/results/quick.json",
              "x/y/tokens.parquet", "stgray/__pycache__/config.cpython-311.pyc",
              ".stgray/ray-auth/auth_token", "s3-data/volume.dat", "stgray.egg-info/PKG-INFO"]:
        assert match(REPO / p), f"{p} would be uploaded with the job"
    for p in ["stgray/store/fs.py", "jobs/pipeline.py", "configs/quickstart.yaml",
              "bench/run.py", "pyproject.toml", "requirements-lock.txt"]:
        assert not match(REPO / p), f"{p} would be left out of the job"


def test_working_dir_package_is_small_and_complete(tmp_path):
    """Zip the checkout with ray's own packaging code and the runtime env's excludes
    (ignoring .gitignore, so the excludes alone must do the job)."""
    from ray._private.runtime_env.packaging import _zip_files

    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), _load(RUNTIME_ENV)["excludes"], str(out), include_gitignore=False)
    names = zipfile.ZipFile(out).namelist()
    assert "stgray/store/fs.py" in names and "jobs/runtime_env.yaml" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "stgray-store/"))]
    assert out.stat().st_size < 20 * 2**20, f"{out.stat().st_size} bytes"


# ----------------------------------------------------------------- Dockerfile, pins

def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", DOCKERFILE.read_text()))


def dockerfile_workdir() -> str:
    return re.findall(r"(?m)^WORKDIR (\S+)$", DOCKERFILE.read_text())[-1]


def test_dockerfile_pins():
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == RAY_VERSION
    assert args["PYTHON_TAG"] == PY_TAG
    assert args["VARIANT"] in ("cpu", "gpu")
    assert re.search(r"(?m)^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$", text)
    assert "-r requirements-lock.txt" in text
    for d in ("jobs", "configs", "stgray"):
        assert re.search(rf"(?m)^COPY .*\b{d} \./{d}$", text), d
    assert pin_problems(text, "Dockerfile") == []
    assert not re.search(r"(?m)^(ENV|ARG)\s+\S*(SECRET|ACCESS_KEY|PASSWORD|TOKEN)", text)


def test_pins_agree_everywhere():
    import tomllib

    import ray

    lock = lock_pins()
    assert lock["ray"] == RAY_VERSION == ray.__version__
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_dep = next(d for d in deps if _norm(d).startswith("ray["))
    assert ray_dep.endswith(f"=={RAY_VERSION}")
    assert lock["torch"] == "2.13.0"
    # the versions the docs and configs mention agree with the lock
    for path in [*LAUNCHERS.values(), KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml",
                 REPO / "docs" / "cluster.md"]:
        text = path.read_text()
        assert pin_problems(text, path.name) == []
        for v in re.findall(r"\bray (\d+\.\d+\.\d+)\b", text):
            assert v == RAY_VERSION, f"{path.name} mentions ray {v}"


def test_pin_check_catches_mismatch():
    assert pin_problems("pip install ray==2.59.0 torch==2.13.0", "x") == [
        "x: ray==2.59.0 but the lock has 2.60.0"]
    assert pin_problems("pip install left-pad==1.0", "x")


# -------------------------------------------------------------------------- secrets

OWNED_FILES = [*LAUNCHERS.values(), *sorted(KUBERAY.glob("*")), RUNTIME_ENV, DOCKERFILE,
               REPO / "docs" / "cluster.md"]


@pytest.mark.parametrize("path", OWNED_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_literal_secrets(path):
    assert secret_problems(path.read_text(), str(path.relative_to(REPO))) == []


def test_secret_scan_catches_secrets():
    key_id = "AKIA" + "Q" * 16  # built here so that this file holds no key-shaped literal
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    hits = secret_problems(f"aws_access_key_id: {key_id}\n", "t")
    assert any("access key id" in h for h in hits)
    assert any("AWS secret" in h for h in secret_problems(f"x: {secret}\n", "t"))
    assert secret_problems("aws_secret_access_key = hunter2\n", "t")
    assert secret_problems("- --env RAY_AUTH_TOKEN=" + "ab12" * 16 + "\n", "t")
    assert secret_problems("-----BEGIN RSA " + "PRIVATE KEY-----\n", "t")
    # references and placeholders are fine
    assert secret_problems("aws_secret_access_key = <HMAC secret>\n", "t") == []
    assert secret_problems("RAY_AUTH_TOKEN_PATH=/home/ray/.stgray-ray-auth/auth_token\n", "t") == []


# ----------------------------------------------------------------------------- docs

def test_docs_reference_existing_files():
    """Paths the docs tell users to pass exist (configs/ and jobs/*.py come from others)."""
    for doc in [REPO / "docs" / "cluster.md", KUBERAY / "README.md"]:
        text = doc.read_text()
        refs = set(re.findall(r"\b((?:cluster|jobs)/[\w./-]+\.(?:yaml|md))\b", text))
        assert refs, doc
        for ref in refs:
            assert (REPO / ref).exists(), f"{doc.name} refers to missing {ref}"
