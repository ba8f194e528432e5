"""A restricted unpickler for the numeric pickles public datasets ship (DCRNN's adj_mx.pkl).

``pickle.load`` runs whatever callable a file names; this loader only resolves the few
globals needed to rebuild numpy arrays and plain containers and refuses every other one
with a DataError, before anything is called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from stgray.errors import DataError

_RECONSTRUCT = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
_FROMBUFFER = np._core.numeric._frombuffer  # type: ignore[attr-defined]

# (module, name) -> object. numpy.core.* are the names numpy 1.x wrote; they are mapped to
# numpy._core directly (importing numpy.core warns on numpy 2).
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,  # type: ignore[attr-defined]
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,  # type: ignore[attr-defined]
    ("_codecs", "encode"): __import__("_codecs").encode,  # py2 byte strings under protocol 2
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "complex"): complex,
    ("__builtin__", "list"): list,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "tuple"): tuple,
    ("__builtin__", "set"): set,
    ("__builtin__", "unicode"): str,
    ("__builtin__", "str"): str,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED`` globals; ``where`` names the file in errors."""

    def __init__(self, file, *, where: str, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding, errors="strict")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        obj = ALLOWED.get((module, name))
        if obj is None:
            raise DataError(f"pickle refers to '{module}.{name}', which is not allowed "
                            "(only numpy arrays and plain containers are loaded)", where=self.where)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("pickle uses persistent ids; refused", where=self.where)


def safe_load(path: str | Path) -> Any:
    """Load a numeric pickle (py2 or py3) without executing anything it names."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", where=str(p)) from None
    return safe_loads(data, where=str(p))


def safe_loads(data: bytes, where: str = "pickle") -> Any:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), where=where).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError) as e:
        raise DataError(f"not a readable pickle ({type(e).__name__}: {str(e)[:120]})", where=where) from None
    _check_no_objects(obj, where)
    return obj


def _check_no_objects(obj: Any, where: str, depth: int = 0) -> None:
    """Refuse object-dtype arrays (they can hold anything) anywhere in the result."""
    if depth > 20:
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise DataError("pickle holds an object-dtype array; refused", where=where)
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_no_objects(v, where, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_no_objects(v, where, depth + 1)
