"""Neural network modules (pure torch)."""

from stgray.nn import mkl_dispatch as _mkl_dispatch

_mkl_dispatch.enable()  # before any matrix product of this process: MKL fixes its kernels at the first
