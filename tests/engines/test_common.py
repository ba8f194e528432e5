"""stgray.engines.common: pieces every engine shares."""

import platform
import subprocess
import sys

import pytest

# a few STGP pre-training steps at the reference width; prints page faults per step
_STEPS = """
import resource, sys, torch
from stgray.engines.common import keep_freed_memory
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
step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(ok, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 3)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_cuts_page_faults_of_training_steps():
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
        ok, n = out.stdout.split()
        return ok, int(n)

    ok, kept = faults("keep")
    _, default = faults("default")
    assert ok == "True"
    assert kept < default / 2, (kept, default)  # measured: ~7k vs ~27k faults per step
