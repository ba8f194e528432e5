"""stgray.engines.common: pieces every engine shares."""

import os
import platform
import subprocess
import sys

import pytest

from stgray.engines.common import JEMALLOC_CONF, TRAINING_SPINCOUNT, jemalloc_path, training_env

# STGP pre-training steps at the reference width; prints page faults per step once the first two
# steps have grown the heap to its peak (later steps can then reuse freed pages instead of faulting)
_STEPS = """
import resource, sys, torch
from stgray.engines.common import allocator, keep_freed_memory
from stgray.nn.stgp.model import STGPModel, STGPModelConfig, masked_mae
from stgray.nn.stgp.template import PatchTemplate
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
torch.manual_seed(0)
B, N, P, L = 4, 100, 25, 12
m = STGPModel(STGPModelConfig())
g = m.graph((torch.rand(N, N) < 0.06).float())
x = torch.randn(B, N, P * L)
tod, dow = torch.arange(P * L)[None].repeat(B, 1) % 288, torch.zeros(B, P * L, dtype=torch.long)
gen, tmpl = torch.Generator().manual_seed(0), PatchTemplate(patch_len=L, num_patches=P, horizon_patches=1)
def step():
    mask = tmpl.pretrain_mask(B, N, 0.5, 0.5, gen)
    masked_mae(m(x, tod, dow, g, mask), x, mask).backward()
step(), step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(ok, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 5, allocator())
"""


def _steps(mode: str, env: dict | None = None) -> tuple[str, int, str]:
    """Runs _STEPS in a fresh interpreter ("keep" or "default" malloc settings, ``env`` added to
    this process's); (keep_freed_memory's result, page faults per step, allocator)."""
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    ok, n, alloc = out.stdout.split()
    return ok, int(n), alloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_cuts_page_faults_of_training_steps():
    ok, kept, _ = _steps("keep")
    _, default, _ = _steps("default")
    assert ok == "True"
    assert kept < default / 4, (kept, default)  # measured: 600-1300 vs 14k-20k faults per step


@pytest.mark.skipif(jemalloc_path() is None, reason="no jemalloc bundled with ray here")
def test_training_env_preloads_jemalloc_that_keeps_freed_pages(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    env = training_env()
    assert env["GOMP_SPINCOUNT"] == TRAINING_SPINCOUNT and env["MALLOC_CONF"] == JEMALLOC_CONF

    _, with_jemalloc, alloc = _steps("default", env)
    _, default, system = _steps("default")
    assert (alloc, system) == ("jemalloc", "system")
    assert with_jemalloc < default / 4, (with_jemalloc, default)  # freed pages are reused, not faulted again
    monkeypatch.setenv("STGRAY_JEMALLOC", "0")
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert training_env() == {"GOMP_SPINCOUNT": "7"}
