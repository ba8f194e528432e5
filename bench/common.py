"""What every benchmark records about where it ran, and helpers the benches share.

Conventions of a result file ``bench/results/<bench>.json`` (``write_result``):
``bench`` (name), ``mode`` (quick/full/...), ``command`` (the exact command line that
wrote it, run from the repository root), ``config_hash`` (of the arguments/config that
define the measurement), ``seeds``, ``machine`` (``machine_info``: CPUs, memory, versions,
load average at the start), ``loadavg_end``, ``started``/``finished`` (UTC ISO) and
``wall_s``; the rest is the bench's own. The quick plan (``python -m bench.run --mode
quick``) passes ``--out bench/results/quick/<bench>.json`` to every bench, so its smoke
figures never replace the measured ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _source_revision() -> str | None:
    """The checked-out commit, read from .git files (no git command is run)."""
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            p = REPO / ".git" / ref[5:]
            if p.is_file():
                return p.read_text().strip()[:12]
            packed = REPO / ".git" / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(ref[5:]):
                        return line.split()[0][:12]
            return None
        return ref[:12]
    except OSError:
        return None


def machine_info() -> dict:
    import numpy
    import torch

    from stgray.nn import mkl_dispatch

    try:
        import ray

        ray_v = ray.__version__
    except ImportError:  # pragma: no cover
        ray_v = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:  # pragma: no cover
        mem_gb = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gb": mem_gb,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": numpy.__version__, "ray": ray_v, "loadavg": os.getloadavg(),
            "cuda": torch.cuda.is_available(), "revision": _source_revision(),
            "mkl_avx512_dispatch": mkl_dispatch.status()}


def config_hash(obj: Any) -> str:
    from stgray.config import content_hash

    return content_hash(obj)


def sample_nodes(num_nodes: int, n: int, seed: int = 0) -> np.ndarray:
    """A seeded, sorted sample of min(n, num_nodes) node ids (the recipes' nodes)."""
    return np.sort(np.random.default_rng(seed).choice(num_nodes, min(num_nodes, n), replace=False))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None, module: str | None = None) -> str:
    """The command that ran this bench, as typed from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    head = f".venv/bin/python -m {module}" if module else ".venv/bin/python " + \
        os.path.relpath(sys.argv[0], REPO)
    return " ".join([head, *map(shlex.quote, args)])


def write_result(name: str, result: dict, *, mode: str, command: str, config: Any,
                 seeds: list[int] | None = None, started: str | None = None,
                 wall_s: float | None = None, out: str | Path | None = None) -> Path:
    """Write ``result`` with the common header (see module doc) to bench/results/<name>.json."""
    head = {"bench": name, "mode": mode, "command": command, "config_hash": config_hash(config),
            "seeds": seeds or [], "machine": result.pop("machine", None) or machine_info(),
            "loadavg_end": os.getloadavg(), "started": started, "finished": now_iso(),
            "wall_s": wall_s}
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**head, **result}, indent=1, default=_json_default))
    return path


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --- memory of a whole process tree ---------------------------------------------------

def tree_memory(pid: int, pss: bool = False) -> int:
    """Summed RSS (or PSS: shared pages split between the processes that map them) in
    bytes of ``pid`` and all its descendants (Ray's GCS, raylet and workers included)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += _pss(p.pid) if pss else p.memory_info().rss
        except (psutil.Error, OSError, ValueError):
            pass
    return total


def _pss(pid: int) -> int:
    """PSS in bytes from /proc/<pid>/smaps_rollup (cheap, unlike a full smaps read)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class TreeSampler:
    """Samples the memory of a process tree in a thread (every ``interval`` s) and keeps
    the peak per named phase: ``with sampler.phase("zoo"): ...``. RSS sums count pages
    shared between processes (torch libraries, Ray's object store) once per process: an
    upper bound; PSS splits them."""

    def __init__(self, pid: int | None = None, interval: float = 0.5, pss: bool = True):
        self.pid = pid or os.getpid()
        self.interval, self.pss = interval, pss
        self.current = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self.samples: list[tuple[float, str, float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _sample(self) -> None:
        rss = tree_memory(self.pid)
        pss = tree_memory(self.pid, pss=True) if self.pss else float("nan")
        ph = self.current
        self.samples.append((round(time.perf_counter() - self.t0, 2), ph, rss / 1e9, pss / 1e9))
        pk = self.peaks.setdefault(ph, {"rss_gb": 0.0, "pss_gb": 0.0})
        pk["rss_gb"] = max(pk["rss_gb"], rss / 1e9)
        if self.pss:
            pk["pss_gb"] = max(pk["pss_gb"], pss / 1e9)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> "TreeSampler":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self._sample()

    def phase(self, name: str):
        sampler = self

        class _Ctx:
            def __enter__(self):
                sampler.current = name
                sampler._sample()
                self.t = time.perf_counter()
                return self

            def __exit__(self, *exc):
                sampler._sample()
                self.seconds = time.perf_counter() - self.t
                sampler.current = "between"
                return False

        return _Ctx()

    def peak(self, key: str = "rss_gb") -> float:
        return max((v[key] for v in self.peaks.values()), default=0.0)


def kept_archs(out: str | Path, run: list[str], mode: str | None = None) -> dict[str, dict]:
    """The ``archs`` entries of an earlier result file at ``out`` that this run does not
    re-run (same ``mode`` when given), marked with when they were measured."""
    p = Path(out)
    if not p.exists():
        return {}
    old = json.loads(p.read_text())
    if mode is not None and old.get("mode") != mode:
        return {}
    return {k: {**v, "measured": v.get("measured", old.get("finished"))}
            for k, v in old.get("archs", {}).items() if k not in run}


def start_ray(num_cpus: int | None = None, tries: int = 4) -> int:
    """``stgray.engines.common.ensure_ray`` with retries: on a loaded machine Ray's fixed
    30 s wait for the raylet to register can expire. Returns the attempts used."""
    import ray

    from stgray.engines.common import ensure_ray

    for i in range(1, tries + 1):
        try:
            ensure_ray(num_cpus=num_cpus)
            return i
        except Exception as e:  # "The current node timed out during startup ..."
            if i == tries or "timed out" not in str(e):
                raise
            print(f"[bench] Ray start attempt {i} failed ({str(e)[:80]}...); retrying", flush=True)
            ray.shutdown()
            time.sleep(5 * i)
    return tries
