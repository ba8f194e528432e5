"""Training engines: per-worker loops and Ray drivers for each stage."""

import stgray.nn  # noqa: F401  (first: MKL's kernel choice on AMD is fixed at the first matrix product)
