"""Let MKL use its AVX-512 kernels on AMD CPUs that have AVX-512 (Zen 4, Zen 5).

MKL picks its kernels by CPU vendor first: on a non-Intel CPU it runs the AVX2 code paths
whatever the CPU supports. torch's wheels link MKL into ``libtorch_cpu.so`` and export its
vendor check, ``mkl_serv_intel_cpu_true``; making it return 1 lets MKL choose by the CPU's
features as it does on Intel (the same effect as the well-known ``LD_PRELOAD`` "fakeintel"
shim, without a compiler or an environment variable that must reach every Ray worker).
Measured on this project's 2-core AMD EPYC (Zen 5) by ``bench.mkl_dispatch``: sgemm 2.1-2.4x
(2048^3: 185 -> 429 GFLOP/s), fp32 STGP pre-training step 1.29x.

MKL reads the vendor once, at its first product: :func:`enable` must run before the
process's first matrix product (``stgray.nn`` calls it on import). It does nothing
unless the CPU is an AMD x86-64 with ``avx512f``, the symbol is there and its code page
can be made writable; ``STGRAY_MKL_AVX512=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform

_CODE = b"\xb8\x01\x00\x00\x00\xc3"  # x86-64: mov eax, 1; ret
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4
_state: dict[str, object] = {"enabled": False, "reason": "not tried"}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> tuple[str, frozenset[str]]:
    """(vendor, flags) of the first CPU in /proc/cpuinfo, read once per process."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor, frozenset(flags)


def applies() -> bool:
    """True on AMD CPUs with AVX-512 (where MKL would otherwise run its AVX2 kernels)."""
    vendor, flags = _cpu_flags()
    return vendor == "AuthenticAMD" and "avx512f" in flags


def stuck_on_avx2() -> bool:
    """True where MKL runs its AVX2 kernels on a CPU that has AVX-512 (AMD, and :func:`enable`
    off, not run yet or failed)."""
    return applies() and not _state["enabled"]


def _patch(addr: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = addr & ~(mmap.PAGESIZE - 1)
    length = addr + len(_CODE) - page
    if libc.mprotect(page, length, _PROT_READ | _PROT_WRITE | _PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    ctypes.memmove(addr, _CODE, len(_CODE))
    libc.mprotect(page, length, _PROT_READ | _PROT_EXEC)


def enable() -> bool:
    """Make MKL dispatch by CPU features on AMD CPUs with AVX-512; True if it now does.
    Idempotent; never raises (the reason it did nothing is in :func:`status`)."""
    if _state["enabled"]:
        return True
    if os.environ.get("STGRAY_MKL_AVX512", "1") == "0":
        _state["reason"] = "STGRAY_MKL_AVX512=0"
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = f"not x86-64 Linux ({platform.system()} {platform.machine()})"
        return False
    if not applies():
        _state["reason"] = f"not needed ({_cpu_flags()[0] or 'unknown vendor'} CPU without AVX-512 or not AMD)"
        return False
    try:
        import torch

        if not torch.backends.mkl.is_available():
            _state["reason"] = "torch without MKL"
            return False
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                          mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        fn = lib.mkl_serv_intel_cpu_true
        fn.restype = ctypes.c_int
        if fn() != 1:
            _patch(ctypes.cast(fn, ctypes.c_void_p).value)
        ok = fn() == 1
    except (OSError, AttributeError) as e:
        _state["reason"] = f"could not patch: {e}"
        return False
    _state.update(enabled=ok, reason="patched" if ok else "patch had no effect")
    return ok


def status() -> dict:
    """{'enabled': bool, 'reason': str}: whether :func:`enable` took effect, and why not."""
    return dict(_state)
