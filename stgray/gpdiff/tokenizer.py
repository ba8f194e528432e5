"""Layer-aware tokens of parameter vectors, per-position normalisation, Parquet shards.

Each tensor of a ``ParamLayout`` is cut into tokens of width C in its own flat order; the
last token of each tensor is zero-padded, so no token mixes two tensors (the reference
reshaped the whole vector to C x P/C). Before tokenising, every parameter position is
standardised with a mean and std fitted on the zoo (streamed, float64, std floored at
``eps``), which makes clamping generated values unnecessary.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stgray.config import StageConfig
from stgray.errors import DataError
from stgray.gpdiff.params import VEC_DTYPE, ParamLayout

_META_L = b"stgray.n_tokens"
_META_C = b"stgray.token_width"
_META_D = b"stgray.prompt_dim"


class TokenizerConfig(StageConfig):
    """Settings of the ``tokens`` stage."""

    width: int = Field(64, gt=0, description="token width C (parameters per token)")
    stats_eps: float = Field(1e-5, gt=0, description="floor of the per-position std")


# ------------------------------------------------------------------------------------
# token layout
# ------------------------------------------------------------------------------------
class TokenLayout(BaseModel):
    """Which tensor each token belongs to and how many of its C slots are real."""

    model_config = ConfigDict(frozen=True)

    width: int = Field(gt=0)
    arch: str
    arch_hash: str
    n_params: int
    tensor_names: tuple[str, ...]
    token_tensor: tuple[int, ...]  # (L,) index into tensor_names
    token_valid: tuple[int, ...]   # (L,) valid length in [1, width]

    @model_validator(mode="after")
    def _check(self) -> "TokenLayout":
        if len(self.token_tensor) != len(self.token_valid):
            raise ValueError("token_tensor and token_valid differ in length")
        if any(not 1 <= v <= self.width for v in self.token_valid):
            raise ValueError("token valid lengths must lie in [1, width]")
        if sum(self.token_valid) != self.n_params:
            raise ValueError("valid lengths do not add up to n_params")
        return self

    @classmethod
    def from_params(cls, layout: ParamLayout, width: int) -> "TokenLayout":
        tt, tv = [], []
        for i, e in enumerate(layout.entries):
            full, rest = divmod(e.numel, width)
            tt += [i] * (full + (rest > 0))
            tv += [width] * full + ([rest] if rest else [])
        return cls(width=width, arch=layout.arch, arch_hash=layout.arch_hash,
                   n_params=layout.n_params, tensor_names=tuple(layout.names),
                   token_tensor=tuple(tt), token_valid=tuple(tv))

    @property
    def n_tokens(self) -> int:
        """L."""
        return len(self.token_tensor)

    @property
    def n_tensors(self) -> int:
        return len(self.tensor_names)

    @cached_property
    def mask(self) -> torch.Tensor:
        """(L, C) bool: True at real parameter slots, False at padding."""
        v = torch.tensor(self.token_valid)
        return torch.arange(self.width)[None, :] < v[:, None]

    @cached_property
    def tensor_ids(self) -> torch.Tensor:
        """(L,) long: tensor index of each token."""
        return torch.tensor(self.token_tensor, dtype=torch.long)

    @cached_property
    def token_rank(self) -> torch.Tensor:
        """(L,) long: index of each token within its tensor (0, 1, ...)."""
        ids = self.tensor_ids
        first = torch.zeros(self.n_tensors, dtype=torch.long)
        if len(ids):
            change = torch.ones(len(ids), dtype=torch.bool)
            change[1:] = ids[1:] != ids[:-1]
            first[ids[change]] = torch.nonzero(change).squeeze(1)
        return torch.arange(len(ids)) - first[ids]

    @cached_property
    def gather_index(self) -> torch.Tensor:
        """(L*C,) long: parameter index of each slot; padding slots point at index P."""
        flat = self.mask.reshape(-1)
        idx = torch.full((flat.numel(),), self.n_params, dtype=torch.long)
        idx[flat] = torch.arange(self.n_params)
        return idx

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "TokenLayout":
        try:
            return cls.model_validate_json(text)
        except ValueError as e:
            raise DataError(f"invalid token layout JSON ({str(e).splitlines()[0]})",
                            where="token layout") from None


# ------------------------------------------------------------------------------------
# normalisation statistics
# ------------------------------------------------------------------------------------
def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x[None] if x.ndim == 1 else x


class StatsAccumulator:
    """Streaming per-position mean/variance (Chan et al. merge, float64).

    ``update`` batches of (B, P) vectors, ``merge`` accumulators from other workers, then
    ``finalize``. Memory is O(P) whatever the zoo size.
    """

    def __init__(self, n_params: int):
        self.n = 0
        self.mean = np.zeros(n_params, np.float64)
        self.m2 = np.zeros(n_params, np.float64)

    def update(self, batch) -> "StatsAccumulator":
        """Add a (B, P) (or (P,)) array/tensor of parameter vectors."""
        x = _as_f64(batch)
        if x.shape[1] != self.mean.shape[0]:
            raise DataError(f"batch has {x.shape[1]} parameters, expected {self.mean.shape[0]}",
                            where="param stats")
        if x.shape[0] == 0:
            return self
        bm = x.mean(0)
        bm2 = ((x - bm) ** 2).sum(0)
        return self._combine(x.shape[0], bm, bm2)

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        return self._combine(other.n, other.mean, other.m2) if other.n else self

    def _combine(self, nb: int, mb: np.ndarray, m2b: np.ndarray) -> "StatsAccumulator":
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta ** 2 * (na * nb / n)
        self.n = n
        return self

    def finalize(self, eps: float = 1e-5, arch_hash: str = "") -> "ParamStats":
        """Population std (ddof=0) floored at ``eps``."""
        if self.n == 0:
            raise DataError("no parameter vectors to fit statistics on", where="param stats")
        std = np.maximum(np.sqrt(self.m2 / self.n), eps)
        return ParamStats(mean=self.mean.copy(), std=std, count=self.n, eps=eps, arch_hash=arch_hash)


@dataclass(frozen=True, eq=False)
class ParamStats:
    """Per-position mean and std (both (P,) float64) of a zoo's parameter vectors."""

    mean: np.ndarray
    std: np.ndarray
    count: int
    eps: float
    arch_hash: str = ""

    @classmethod
    def fit(cls, batches: Iterable[Any], n_params: int, eps: float = 1e-5,
            arch_hash: str = "") -> "ParamStats":
        """Stream over (B, P) batches (numpy or torch)."""
        acc = StatsAccumulator(n_params)
        for b in batches:
            acc.update(b)
        return acc.finalize(eps, arch_hash)

    @classmethod
    def identity(cls, n_params: int, arch_hash: str = "") -> "ParamStats":
        """mean 0, std 1: tokens carry raw parameter values."""
        return cls(np.zeros(n_params), np.ones(n_params), 0, 0.0, arch_hash)

    @property
    def n_params(self) -> int:
        return int(self.mean.shape[0])

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {"mean": np.asarray(self.mean, np.float64), "std": np.asarray(self.std, np.float64),
                "count": np.asarray(self.count, np.int64), "eps": np.asarray(self.eps, np.float64),
                "arch_hash": np.asarray(self.arch_hash)}

    @classmethod
    def from_numpy(cls, d: dict[str, np.ndarray]) -> "ParamStats":
        return cls(mean=np.asarray(d["mean"], np.float64), std=np.asarray(d["std"], np.float64),
                   count=int(d["count"]), eps=float(d["eps"]), arch_hash=str(d["arch_hash"]))

    def to_bytes(self) -> bytes:
        """``.npz`` bytes (no pickled objects)."""
        buf = io.BytesIO()
        np.savez(buf, **self.to_numpy())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ParamStats":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls.from_numpy({k: z[k] for k in z.files})
        except (ValueError, KeyError, OSError) as e:
            raise DataError(f"unreadable parameter statistics ({type(e).__name__}: {e})",
                            where="param stats") from None


# ------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------
class Tokenizer:
    """Parameter vectors (B, P) <-> normalised tokens (B, L, C), padding slots zero.

    Arithmetic is done in float64, so ``decode(encode(v))`` returns ``v`` up to the
    rounding of the tokens' dtype (bit-exact with ``dtype=torch.float64``). No clamping.
    """

    def __init__(self, layout: TokenLayout, stats: ParamStats | None = None):
        stats = stats or ParamStats.identity(layout.n_params, layout.arch_hash)
        if stats.n_params != layout.n_params:
            raise DataError(f"statistics cover {stats.n_params} parameters, layout has "
                            f"{layout.n_params}", where="tokenizer")
        if stats.arch_hash and stats.arch_hash != layout.arch_hash:
            raise DataError("statistics were fitted on another architecture", where="tokenizer")
        self.layout, self.stats = layout, stats
        self._dev: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def fit(cls, params: ParamLayout, batches: Iterable[Any], width: int, eps: float = 1e-5
            ) -> "Tokenizer":
        """Layout from ``params`` and statistics streamed over (B, P) batches."""
        stats = ParamStats.fit(batches, params.n_params, eps, params.arch_hash)
        return cls(TokenLayout.from_params(params, width), stats)

    def _on(self, device: torch.device):
        if device not in self._dev:
            L = self.layout
            self._dev[device] = (torch.as_tensor(self.stats.mean, device=device),
                                 torch.as_tensor(self.stats.std, device=device),
                                 L.gather_index.to(device), L.mask.reshape(-1).to(device))
        return self._dev[device]

    @property
    def mask(self) -> torch.Tensor:
        """(L, C) bool valid-slot mask."""
        return self.layout.mask

    def encode(self, vecs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, P) or (P,) parameters -> (B, L, C) or (L, C) normalised tokens."""
        single = vecs.dim() == 1
        v = vecs[None] if single else vecs
        if v.dim() != 2 or v.shape[1] != self.layout.n_params:
            raise DataError(f"expected (B, {self.layout.n_params}) vectors, got "
                            f"{tuple(vecs.shape)}", where="tokenizer")
        mean, std, idx, _ = self._on(v.device)
        z = (v.to(torch.float64) - mean) / std
        z = torch.cat([z, z.new_zeros(z.shape[0], 1)], dim=1)  # slot P = padding
        tok = z[:, idx].to(dtype).reshape(v.shape[0], self.layout.n_tokens, self.layout.width)
        return tok[0] if single else tok

    def decode(self, tokens: torch.Tensor, dtype: torch.dtype = VEC_DTYPE) -> torch.Tensor:
        """(B, L, C) or (L, C) tokens -> (B, P) or (P,) parameters; padding ignored."""
        single = tokens.dim() == 2
        t = tokens[None] if single else tokens
        L, C = self.layout.n_tokens, self.layout.width
        if t.dim() != 3 or tuple(t.shape[1:]) != (L, C):
            raise DataError(f"expected (B, {L}, {C}) tokens, got {tuple(tokens.shape)}",
                            where="tokenizer")
        mean, std, _, valid = self._on(t.device)
        z = t.reshape(t.shape[0], L * C)[:, valid].to(torch.float64)
        v = (z * std + mean).to(dtype)
        return v[0] if single else v


# ------------------------------------------------------------------------------------
# Parquet shards
# ------------------------------------------------------------------------------------
def token_schema(n_tokens: int, width: int, prompt_dim: int,
                 metadata: dict[str, str] | None = None) -> pa.Schema:
    """city string, node int32, arch string, tokens float32[L*C], prompt float32[D]."""
    meta = {_META_L: str(n_tokens).encode(), _META_C: str(width).encode(),
            _META_D: str(prompt_dim).encode()}
    meta.update({k.encode(): v.encode() for k, v in (metadata or {}).items()})
    return pa.schema([("city", pa.string()), ("node", pa.int32()), ("arch", pa.string()),
                      ("tokens", pa.list_(pa.float32(), n_tokens * width)),
                      ("prompt", pa.list_(pa.float32(), prompt_dim))], metadata=meta)


def _fixed(x: np.ndarray, n: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), n)


def _strings(x: str | Sequence[str], n: int) -> pa.Array:
    return pa.array([x] * n if isinstance(x, str) else list(x), pa.string())


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class TokenParquetWriter:
    """Stream rows to one Parquet file (path or binary file object); use as a context manager.

    ``metadata`` (str -> str) goes into the schema, e.g. the token layout JSON.
    """

    def __init__(self, sink: Any, n_tokens: int, width: int, prompt_dim: int,
                 metadata: dict[str, str] | None = None, compression: str = "zstd"):
        self.schema = token_schema(n_tokens, width, prompt_dim, metadata)
        self.L, self.C, self.D = n_tokens, width, prompt_dim
        self._w = pq.ParquetWriter(sink, self.schema, compression=compression)
        self.rows = 0

    def write(self, city: str | Sequence[str], node, arch: str | Sequence[str], tokens,
              prompts) -> None:
        """tokens (N, L, C) or (N, L*C); prompts (N, D); node (N,) ints."""
        tok, pr, nd = _np(tokens), _np(prompts), _np(node).astype(np.int32).reshape(-1)
        n = nd.shape[0]
        if tok.reshape(n, -1).shape[1] != self.L * self.C or pr.reshape(n, -1).shape[1] != self.D:
            raise DataError(f"rows do not fit the shard schema (tokens {tok.shape}, prompts "
                            f"{pr.shape}, want L*C={self.L * self.C}, D={self.D})", where="token shard")
        batch = pa.record_batch([_strings(city, n), pa.array(nd, pa.int32()), _strings(arch, n),
                                 _fixed(tok, self.L * self.C), _fixed(pr, self.D)],
                                schema=self.schema)
        self._w.write_batch(batch)
        self.rows += n

    def close(self) -> None:
        self._w.close()

    def __enter__(self) -> "TokenParquetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_token_parquet(sink: Any, city, node, arch, tokens, prompts,
                        metadata: dict[str, str] | None = None) -> None:
    """Write one table: tokens (N, L, C), prompts (N, D)."""
    tok = _np(tokens)
    if tok.ndim != 3:
        raise DataError(f"tokens must be (N, L, C), got {tok.shape}", where="token shard")
    with TokenParquetWriter(sink, tok.shape[1], tok.shape[2], _np(prompts).shape[-1],
                            metadata) as w:
        w.write(city, node, arch, tok, prompts)


@dataclass
class TokenTable:
    """A token shard in memory. tokens (N, L, C) float32, prompts (N, D) float32."""

    city: np.ndarray
    node: np.ndarray
    arch: np.ndarray
    tokens: np.ndarray
    prompts: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.node.shape[0])


def _fixed_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    n, k = len(arr), arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False, writable=True)
    return flat.astype(np.float32, copy=False).reshape(n, k)


def read_token_parquet(source: Any, filesystem=None) -> TokenTable:
    """Read a shard written by ``write_token_parquet``/``TokenParquetWriter`` back to numpy."""
    table = pq.read_table(source, filesystem=filesystem)
    meta = table.schema.metadata or {}
    tok = _fixed_to_numpy(table.column("tokens"))
    if _META_L in meta and _META_C in meta:
        tok = tok.reshape(len(table), int(meta[_META_L]), int(meta[_META_C]))
    extra = {k.decode(): v.decode() for k, v in meta.items()
             if k not in (_META_L, _META_C, _META_D) and not k.startswith((b"ARROW:", b"pandas"))}
    return TokenTable(city=np.asarray(table.column("city").to_pylist(), dtype=object),
                      node=table.column("node").to_numpy().astype(np.int32),
                      arch=np.asarray(table.column("arch").to_pylist(), dtype=object),
                      tokens=tok, prompts=_fixed_to_numpy(table.column("prompt")),
                      metadata=extra)


def layout_metadata(layout: TokenLayout) -> dict[str, str]:
    """Schema metadata carrying the token layout (read back with ``TokenLayout.from_json``)."""
    return {"stgray.token_layout": layout.to_json()}


__all__ = ["TokenizerConfig", "TokenLayout", "StatsAccumulator", "ParamStats", "Tokenizer",
           "token_schema", "TokenParquetWriter", "write_token_parquet", "TokenTable",
           "read_token_parquet", "layout_metadata"]

