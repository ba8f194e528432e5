"""Named, typed layout of a model's parameters as one flat vector.

The reference keeps only flat vectors and loses names and shapes; ``ParamLayout`` keeps
them (in ``named_parameters()`` order) plus an architecture hash, so a vector can always
be turned back into a ``state`` dict for ``torch.func.functional_call`` and vectors of
different architectures are never mixed.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stgray.config import content_hash
from stgray.errors import DataError

#: dtype of every flat vector (per-tensor dtypes are restored by ``unflatten``).
VEC_DTYPE = torch.float32


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise DataError(f"unknown dtype '{name}'", where="param layout")
    return dt


class ParamEntry(BaseModel):
    """One tensor: its slice ``[offset, offset + numel)`` of the flat vector."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, ...]
    offset: int = Field(ge=0)
    numel: int = Field(ge=0)
    dtype: str = "float32"


class ParamLayout(BaseModel):
    """Ordered tensors of one architecture; JSON-serialisable (``to_json``/``from_json``)."""

    model_config = ConfigDict(frozen=True)

    arch: str
    entries: tuple[ParamEntry, ...]

    @model_validator(mode="after")
    def _check(self) -> "ParamLayout":
        off, seen = 0, set()
        for e in self.entries:
            if e.name in seen:
                raise ValueError(f"duplicate tensor name '{e.name}'")
            seen.add(e.name)
            if e.offset != off or e.numel != math.prod(e.shape):
                raise ValueError(f"tensor '{e.name}': offset/numel inconsistent with shapes")
            off += e.numel
        return self

    # construction ------------------------------------------------------------------
    @classmethod
    def from_shapes(cls, arch: str, shapes: Iterable[tuple[str, tuple[int, ...], torch.dtype | str]]
                    ) -> "ParamLayout":
        """From ``(name, shape, dtype)`` triples, in order."""
        entries, off = [], 0
        for name, shape, dt in shapes:
            shape = tuple(int(s) for s in shape)
            n = math.prod(shape)
            entries.append(ParamEntry(name=name, shape=shape, offset=off, numel=n,
                                      dtype=dt if isinstance(dt, str) else _dtype_name(dt)))
            off += n
        return cls(arch=arch, entries=tuple(entries))

    @classmethod
    def from_state(cls, arch: str, state: Mapping[str, torch.Tensor]) -> "ParamLayout":
        """From a dict of tensors (insertion order is the vector order)."""
        return cls.from_shapes(arch, ((k, tuple(v.shape), v.dtype) for k, v in state.items()))

    @classmethod
    def from_module(cls, arch: str, module: torch.nn.Module, include_buffers: bool = False
                    ) -> "ParamLayout":
        """From ``module.named_parameters()`` (then buffers, if asked), in that order."""
        items = list(module.named_parameters())
        if include_buffers:
            items += list(module.named_buffers())
        return cls.from_state(arch, dict(items))

    # properties --------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """P, the length of the flat vector."""
        return self.entries[-1].offset + self.entries[-1].numel if self.entries else 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def arch_hash(self) -> str:
        """Hash of arch name and every tensor's name, shape and dtype (not the values)."""
        return content_hash({"arch": self.arch,
                             "tensors": [[e.name, list(e.shape), e.dtype] for e in self.entries]})

    def check_same(self, other: "ParamLayout", where: str = "param layout") -> None:
        if other.arch_hash != self.arch_hash:
            raise DataError(f"architecture mismatch ({other.arch} {other.arch_hash} vs "
                            f"{self.arch} {self.arch_hash})", where=where)

    # conversion --------------------------------------------------------------------
    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``state`` of ``shape`` tensors -> (P,); of ``(B, *shape)`` tensors -> (B, P).

        Values are cast to float32; keys must be exactly the layout's names.
        """
        missing = [n for n in self.names if n not in state]
        extra = [k for k in state if k not in set(self.names)]
        if missing or extra:
            raise DataError(f"state does not match layout '{self.arch}' (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})", where="param layout")
        if not self.entries:
            return torch.zeros(0, dtype=VEC_DTYPE)
        first = self.entries[0]
        batched = state[first.name].dim() == len(first.shape) + 1
        parts = []
        for e in self.entries:
            t = state[e.name]
            want = ((t.shape[0],) if batched else ()) + e.shape
            if tuple(t.shape) != want or (batched and t.shape[0] != state[first.name].shape[0]):
                raise DataError(f"tensor '{e.name}' has shape {tuple(t.shape)}, layout says "
                                f"{'(B, ' if batched else '('}{', '.join(map(str, e.shape))})",
                                where="param layout")
            parts.append(t.detach().reshape(t.shape[0], -1) if batched else t.detach().reshape(-1))
        return torch.cat([p.to(VEC_DTYPE) for p in parts], dim=-1)

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """(P,) -> {name: shape}; (B, P) -> {name: (B, *shape)}. Views where dtypes allow."""
        if vec.shape[-1] != self.n_params or vec.dim() not in (1, 2):
            raise DataError(f"vector of shape {tuple(vec.shape)} does not fit layout "
                            f"'{self.arch}' (P={self.n_params})", where="param layout")
        lead = tuple(vec.shape[:-1])
        out = {}
        for e in self.entries:
            t = vec[..., e.offset:e.offset + e.numel].reshape(lead + e.shape)
            dt = _dtype(e.dtype)
            out[e.name] = t if t.dtype == dt else t.to(dt)
        return out

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "ParamLayout":
        try:
            return cls.model_validate_json(text)
        except ValueError as e:
            raise DataError(f"invalid param layout JSON ({str(e).splitlines()[0]})",
                            where="param layout") from None
