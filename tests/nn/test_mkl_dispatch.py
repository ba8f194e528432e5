"""MKL's AVX-512 dispatch on AMD: on when the CPU can use it, off when told, products unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from stgray.nn import mkl_dispatch

_PROBE = """
import json, torch, stgray.nn
from stgray.nn import mkl_dispatch
torch.manual_seed(0)
a, b = torch.randn(300, 200), torch.randn(200, 150)
ref = (a.double() @ b.double())
err = ((a @ b).double() - ref).abs().max().item() / ref.abs().max().item()
print(json.dumps({**mkl_dispatch.status(), "rel_err": err}))
"""


def _probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_enabled_exactly_on_amd_with_avx512_and_products_unchanged():
    expect = mkl_dispatch.applies()
    on = _probe()
    assert on["enabled"] is expect, on
    assert on["rel_err"] < 1e-6
    off = _probe(STGRAY_MKL_AVX512="0")
    assert off == {**off, "enabled": False, "reason": "STGRAY_MKL_AVX512=0"}
    assert off["rel_err"] < 1e-6


def test_status_in_this_process_says_why():
    s = mkl_dispatch.status()
    assert set(s) == {"enabled", "reason"} and isinstance(s["reason"], str) and s["reason"] != "not tried"
