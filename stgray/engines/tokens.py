"""GPDiff stage 2: the ``tokens`` artifact -- a zoo's parameter vectors as normalised,
layer-aware tokens with one prompt per node, in Parquet shards for Ray Data.

``run_tokens`` streams the zoo table (``zoo.parquet``) twice in row batches, so memory
is O(batch x P) whatever the zoo size:

1. fit per-position mean/std with the streaming accumulator (float64, one pass);
2. tokenize each batch and append it to the current shard, a Parquet object written
   through ``writer.open`` (streamed to the store, hashed on the way); a new shard starts
   every ``rows_per_shard`` rows.

Each row: city, node, arch, tokens float32[L*C], prompt float32[D]. Prompts come from
``stgray.gpdiff.prompts.node_prompts`` on the *train* split of the node's source city
(the prepared artifact the zoo model was trained on). The artifact also holds
``stats.npz`` (``ParamStats``), ``param_layout.json``, ``token_layout.json`` and
``shards.json`` (names and row counts); meta has rows, L, C, D, P and the shard count.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from stgray.config import StageConfig
from stgray.data.prepare import Prepared, load_prepared
from stgray.errors import ConfigError, DataError, StoreError
from stgray.gpdiff.params import ParamLayout
from stgray.gpdiff.prompts import node_prompts
from stgray.gpdiff.tokenizer import (ParamStats, StatsAccumulator, TokenLayout, Tokenizer,
                                     TokenParquetWriter, TokenTable, layout_metadata,
                                     read_token_parquet)

TOKENS_KIND = "tokens"
ZOO_TABLE = "zoo.parquet"
#: Names under which a zoo artifact may hold its ``ParamLayout`` JSON (first found wins).
ZOO_LAYOUT_NAMES = ("layout.json", "param_layout.json")
SHARD_PREFIX = "shards/"


class TokensConfig(StageConfig):
    """The ``tokens`` stage. ``read_batch_rows`` only changes memory use, not the result."""

    _unhashed: ClassVar[frozenset[str]] = frozenset({"read_batch_rows"})

    width: int = Field(64, gt=0, description="token width C (parameters per token)")
    stats_eps: float = Field(1e-5, gt=0, description="floor of the per-position std")
    rows_per_shard: int = Field(4096, gt=0, description="rows per Parquet shard (at most)")
    walk_length: int = Field(8, gt=0, description="random-walk steps of the spatial prompt")
    read_batch_rows: int = Field(256, gt=0, description="zoo rows per streamed batch (memory)")


# ------------------------------------------------------------------------------------
# reading the zoo
# ------------------------------------------------------------------------------------
def zoo_param_layout(store, zoo_id: str, manifest=None) -> ParamLayout:
    """The zoo's ``ParamLayout`` (its recorded arch hash, if any, is checked)."""
    m = manifest or store.manifest(zoo_id)
    name = next((n for n in ZOO_LAYOUT_NAMES if n in m.files), None)
    if name is None:
        raise DataError(f"zoo has no parameter layout (looked for {', '.join(ZOO_LAYOUT_NAMES)})",
                        where=zoo_id)
    raw = store.read_bytes(zoo_id, name, m)
    layout = ParamLayout.from_json(raw)
    recorded = json.loads(raw).get("arch_hash")
    if recorded and recorded != layout.arch_hash:
        raise DataError("zoo layout does not match its recorded arch hash", where=zoo_id)
    return layout


def zoo_sources(store, zoo_id: str, manifest=None) -> dict[str, str]:
    """``{city name: prepared id}`` of the zoo's source cities, from its ``splits.json``
    (``{prepared id: prepared stats}``, written by ``stgray.engines.zoo.write_zoo``)."""
    m = manifest or store.manifest(zoo_id)
    if "splits.json" not in m.files:
        raise DataError("zoo does not list its source cities (no splits.json); pass "
                        "prepared_ids explicitly", where=zoo_id)
    out: dict[str, str] = {}
    for pid, stats in store.read_json(zoo_id, "splits.json", m).items():
        name = stats.get("name") if isinstance(stats, dict) else None
        if not name:
            raise DataError(f"splits.json entry for {pid} has no city name", where=zoo_id)
        if name in out and out[name] != pid:
            raise DataError(f"two source artifacts are named '{name}'", where=zoo_id)
        out[name] = pid
    return out


def _open_zoo_table(store, zoo_id: str, manifest) -> pq.ParquetFile:
    """The zoo table, opened for streaming (pages read incrementally, no pre-buffering)."""
    if ZOO_TABLE not in manifest.files:
        raise DataError(f"zoo has no '{ZOO_TABLE}'", where=zoo_id)
    fs, _ = store.arrow_fs()
    f = fs.open_input_file(store.object_path(zoo_id, ZOO_TABLE, manifest))
    return pq.ParquetFile(f, buffer_size=4 << 20, pre_buffer=False)


def _params_of(batch: pa.RecordBatch, n_params: int, where: str) -> np.ndarray:
    col = batch.column(batch.schema.get_field_index("params"))
    if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != n_params:
        raise DataError(f"zoo column 'params' is {col.type}, want fixed_size_list<float>"
                        f"[{n_params}]", where=where)
    if col.null_count:
        raise DataError("zoo has rows without parameters", where=where)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.array(flat, dtype=np.float32).reshape(len(batch), n_params)  # writable copy


def _check_finite(vecs: np.ndarray, cities, nodes, where: str) -> None:
    bad = ~np.isfinite(vecs).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{int(bad.sum())} zoo models have non-finite parameters (first: "
                        f"{cities[i]} node {nodes[i]})", where=where)


# ------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------
def tokens_id_for(store, cfg: TokensConfig, zoo_id: str,
                  prepared_ids: dict[str, str] | None = None) -> str:
    srcs = prepared_ids if prepared_ids is not None else zoo_sources(store, zoo_id)
    return store.id_for(TOKENS_KIND, _config(cfg, srcs), [zoo_id, *sorted(set(srcs.values()))])


def _config(cfg: TokensConfig, sources: dict[str, str]) -> dict[str, Any]:
    return {"tokens": cfg.hashed_dict(), "prompt_sources": dict(sorted(sources.items()))}


def source_prompts(store, prepared_ids: dict[str, str], walk_length: int) -> dict[str, np.ndarray]:
    """``{city: (N, D) prompts}`` from the train split of each source city."""
    out: dict[str, np.ndarray] = {}
    for city, pid in sorted(prepared_ids.items()):
        p = load_prepared(store, pid)
        if p.name != city:
            raise DataError(f"prepared artifact is city '{p.name}', not '{city}'", where=pid)
        out[city] = node_prompts(p, split="train", walk_length=walk_length)
        del p
    dims = {v.shape[1] for v in out.values()}
    if len(dims) > 1:
        raise DataError(f"source cities give prompts of different sizes {sorted(dims)} "
                        "(steps per day differ?)", where="tokens")
    return out


def prompts_for(store, tokens_id: str, prepared: Prepared, split: str = "train") -> np.ndarray:
    """(N, D) prompts of ``prepared`` computed as the tokens stage computed its sources'
    (same walk length; a target city's ``train`` split is its few days)."""
    cfg = TokensConfig.model_validate(store.manifest(tokens_id).config["tokens"])
    pr = node_prompts(prepared, split=split, walk_length=cfg.walk_length)
    d = int(store.manifest(tokens_id).meta["D"])
    if pr.shape[1] != d:
        raise DataError(f"prompts of {prepared.name} have {pr.shape[1]} dims, the tokens "
                        f"artifact {d} (steps per day differ?)", where=tokens_id)
    return pr


class _ShardSink:
    """Rolls token rows over Parquet objects of at most ``rows_per_shard`` rows."""

    def __init__(self, writer, layout: TokenLayout, prompt_dim: int, rows_per_shard: int):
        self.w, self.layout, self.d, self.cap = writer, layout, prompt_dim, rows_per_shard
        self.meta = layout_metadata(layout)
        self.shards: list[dict[str, Any]] = []
        self._ctx = self._pw = None

    def _open(self) -> None:
        name = f"{SHARD_PREFIX}part-{len(self.shards):05d}.parquet"
        self._ctx = self.w.open(name)
        f = self._ctx.__enter__()
        self._pw = TokenParquetWriter(f, self.layout.n_tokens, self.layout.width, self.d, self.meta)
        self.shards.append({"name": name, "rows": 0})

    def _close(self, exc: bool = False) -> None:
        """Finish the current shard; after an error (``exc``) just release it quietly --
        the artifact writer then discards the whole attempt."""
        if self._pw is None:
            return
        pw, ctx = self._pw, self._ctx
        self._pw = self._ctx = None
        if not exc:
            pw.close()
            ctx.__exit__(None, None, None)
            return
        import contextlib

        with contextlib.suppress(Exception):
            pw.close()
        with contextlib.suppress(Exception):
            ctx.__exit__(None, None, None)

    def write(self, city, node, arch, tokens: np.ndarray, prompts: np.ndarray) -> None:
        i, n = 0, len(node)
        while i < n:
            if self._pw is None:
                self._open()
            k = min(n - i, self.cap - self.shards[-1]["rows"])
            self._pw.write(city[i:i + k], node[i:i + k], arch[i:i + k], tokens[i:i + k],
                           prompts[i:i + k])
            self.shards[-1]["rows"] += k
            i += k
            if self.shards[-1]["rows"] >= self.cap:
                self._close()

    def close(self, exc: bool = False) -> None:
        self._close(exc)


def run_tokens(store, cfg: TokensConfig, zoo_id: str,
               prepared_ids: dict[str, str] | None = None, *,
               info: dict | None = None) -> tuple[str, bool]:
    """Tokenize a zoo (idempotent); returns ``(tokens artifact id, skipped)``.

    ``prepared_ids``: ``{city name: prepared id}`` of the source cities whose prompts
    describe the zoo's nodes (default: the zoo's own sources). Rows whose ``prepared_id``
    column (if the zoo has one) names another artifact are refused. ``info`` receives
    timings and sizes.
    """
    info = info if info is not None else {}
    zm = store.manifest(zoo_id)
    sources = dict(prepared_ids) if prepared_ids is not None else zoo_sources(store, zoo_id, zm)
    if not sources:
        raise ConfigError("no source cities for the prompts", field="prepared_ids")
    config, inputs = _config(cfg, sources), [zoo_id, *sorted(set(sources.values()))]
    aid = store.id_for(TOKENS_KIND, config, inputs)
    info["tokens_id"] = aid
    if store.exists(aid):
        return aid, True

    playout = zoo_param_layout(store, zoo_id, zm)
    tlayout = TokenLayout.from_params(playout, cfg.width)
    P = playout.n_params
    t0 = time.perf_counter()
    store.verify(zoo_id, [ZOO_TABLE])  # streamed checksum: the table is read twice below
    t_verify = time.perf_counter() - t0

    # pass 1: statistics (and which cities/nodes the zoo has)
    t0 = time.perf_counter()
    pf = _open_zoo_table(store, zoo_id, zm)
    names = set(pf.schema_arrow.names)
    missing = {"city", "node", "params"} - names
    if missing:
        raise DataError(f"zoo table lacks columns {sorted(missing)}", where=zoo_id)
    has_pid, has_arch = "prepared_id" in names, "arch" in names
    cols1 = ["params", "city", "node"] + (["prepared_id"] if has_pid else [])
    acc = StatsAccumulator(P)
    city_rows: dict[str, int] = {}
    max_node: dict[str, int] = {}
    for b in pf.iter_batches(batch_size=cfg.read_batch_rows, columns=cols1):
        vecs = _params_of(b, P, zoo_id)
        cities = b.column(b.schema.get_field_index("city")).to_pylist()
        nodes = b.column(b.schema.get_field_index("node")).to_numpy(zero_copy_only=False)
        _check_finite(vecs, cities, nodes, zoo_id)
        acc.update(vecs)
        for c, n in zip(cities, nodes.tolist()):
            city_rows[c] = city_rows.get(c, 0) + 1
            max_node[c] = max(max_node.get(c, -1), n)
        if has_pid:
            pids = b.column(b.schema.get_field_index("prepared_id")).to_pylist()
            for c, pid in set(zip(cities, pids)):
                if c in sources and sources[c] != pid:
                    raise DataError(f"zoo models of '{c}' were trained on {pid}, prompts were "
                                    f"asked from {sources[c]}", where=zoo_id)
    if acc.n == 0:
        raise DataError("the zoo has no models", where=zoo_id)
    nosrc = sorted(set(city_rows) - set(sources))
    if nosrc:
        raise DataError(f"no prepared artifact for the zoo's cities {nosrc} (prompts)",
                        where=zoo_id)
    stats = acc.finalize(cfg.stats_eps, playout.arch_hash)
    t_stats = time.perf_counter() - t0

    prompts = source_prompts(store, {c: sources[c] for c in city_rows}, cfg.walk_length)
    for c, n in max_node.items():
        if n >= prompts[c].shape[0]:
            raise DataError(f"zoo has node {n} of '{c}', which has {prompts[c].shape[0]} nodes",
                            where=zoo_id)
    D = int(next(iter(prompts.values())).shape[1])
    tok = Tokenizer(tlayout, stats)

    # pass 2: tokens into shards
    t0 = time.perf_counter()
    rows = 0
    meta = {"rows": acc.n, "L": tlayout.n_tokens, "C": tlayout.width, "D": D, "P": P,
            "arch": playout.arch, "arch_hash": playout.arch_hash, "cities": city_rows,
            "zoo_id": zoo_id}
    with store.writer(TOKENS_KIND, config, inputs, label=f"{playout.arch} tokens: {acc.n} rows",
                      meta=meta) as w:
        sink = _ShardSink(w, tlayout, D, cfg.rows_per_shard)
        ok = False
        try:
            pf = _open_zoo_table(store, zoo_id, zm)
            cols2 = ["params", "city", "node"] + (["arch"] if has_arch else [])
            for b in pf.iter_batches(batch_size=cfg.read_batch_rows, columns=cols2):
                vecs = _params_of(b, P, zoo_id)
                cities = b.column(b.schema.get_field_index("city")).to_pylist()
                nodes = b.column(b.schema.get_field_index("node")).to_numpy(zero_copy_only=False)
                arch = b.column(b.schema.get_field_index("arch")).to_pylist() if has_arch \
                    else [playout.arch] * len(b)
                if any(a != playout.arch for a in arch):
                    raise DataError(f"zoo rows of architecture {sorted(set(arch) - {playout.arch})}"
                                    f" next to '{playout.arch}' (one architecture per zoo)",
                                    where=zoo_id)
                pr = np.stack([prompts[c][n] for c, n in zip(cities, nodes.tolist())])
                toks = tok.encode(torch.from_numpy(vecs)).numpy()
                sink.write(cities, nodes, arch, toks, pr)
                rows += len(b)
            sink.close()
            ok = True
        finally:
            if not ok:
                sink.close(exc=True)
        if rows != acc.n:
            raise StoreError(f"zoo table changed between passes ({acc.n} then {rows} rows)",
                             where=zoo_id)
        w.meta["shards"] = len(sink.shards)
        w.meta["seconds"] = {"verify": round(t_verify, 3), "stats": round(t_stats, 3),
                             "tokenize": round(time.perf_counter() - t0, 3)}
        w.put_bytes("stats.npz", stats.to_bytes())
        w.put_bytes("param_layout.json", playout.to_json().encode())
        w.put_bytes("token_layout.json", tlayout.to_json().encode())
        w.put_json("shards.json", sink.shards)
    info.update(rows=acc.n, shards=len(sink.shards), **w.meta["seconds"])
    return aid, False


# ------------------------------------------------------------------------------------
# reading the artifact
# ------------------------------------------------------------------------------------
@dataclass
class TokensInfo:
    """What a ``tokens`` artifact holds (shard data stays in the store)."""

    id: str
    config: TokensConfig
    param_layout: ParamLayout
    token_layout: TokenLayout
    stats: ParamStats
    shards: list[str]          # object names, in order
    shard_rows: list[int]
    shard_paths: list[str]     # store-internal paths for ``store.arrow_fs()[0]``
    rows: int
    prompt_dim: int
    sources: dict[str, str]    # city -> prepared id
    manifest: Any

    @property
    def n_tokens(self) -> int:
        return self.token_layout.n_tokens

    @property
    def width(self) -> int:
        return self.token_layout.width

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.token_layout, self.stats)


def load_tokens_info(store, tokens_id: str) -> TokensInfo:
    """Layouts, statistics and shard paths of a ``tokens`` artifact (small objects only,
    each verified against the manifest; shards are not read)."""
    m = store.manifest(tokens_id)
    if m.kind != TOKENS_KIND:
        raise DataError(f"artifact is a '{m.kind}', not tokens", where=tokens_id)
    cfg = TokensConfig.model_validate(m.config["tokens"])
    playout = ParamLayout.from_json(store.read_bytes(tokens_id, "param_layout.json", m))
    tlayout = TokenLayout.from_json(store.read_bytes(tokens_id, "token_layout.json", m))
    stats = ParamStats.from_bytes(store.read_bytes(tokens_id, "stats.npz", m))
    if tlayout.arch_hash != playout.arch_hash or (stats.arch_hash and
                                                   stats.arch_hash != playout.arch_hash):
        raise DataError("layouts and statistics disagree on the architecture", where=tokens_id)
    shards = store.read_json(tokens_id, "shards.json", m)
    names = [s["name"] for s in shards]
    return TokensInfo(id=tokens_id, config=cfg, param_layout=playout, token_layout=tlayout,
                      stats=stats, shards=names, shard_rows=[int(s["rows"]) for s in shards],
                      shard_paths=[store.object_path(tokens_id, n, m) for n in names],
                      rows=int(m.meta["rows"]), prompt_dim=int(m.meta["D"]),
                      sources=dict(m.config.get("prompt_sources", {})), manifest=m)


def read_token_shard(store, tokens_id: str, name: str, manifest=None) -> TokenTable:
    """One shard in memory (verified); tokens (N, L, C)."""
    import io

    return read_token_parquet(io.BytesIO(store.read_bytes(tokens_id, name, manifest)))


__all__ = ["TOKENS_KIND", "TokensConfig", "TokensInfo", "run_tokens", "tokens_id_for",
           "load_tokens_info", "read_token_shard", "zoo_param_layout", "zoo_sources",
           "source_prompts", "prompts_for"]
