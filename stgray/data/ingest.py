"""Import a dataset into the store as a ``city`` artifact (idempotent by source checksums).

The artifact's config is ``{"dataset", "format", "options", "sources": {file: sha256}}``,
so importing the same files with the same options again finds the committed artifact and
skips reading them. Resampling is not done here (``stgray.data.prepare`` does it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stgray.data.city import CITY_KIND, City, read_city, write_city
from stgray.data.importers import Resolved, resolve
from stgray.data.importers.common import sha256_file


def city_config(r: Resolved) -> dict[str, Any]:
    """The hashed config of an import: what was read and how (not where it lay on disk)."""
    options = {k: (Path(v).name if k in ("graph", "coords") else v) for k, v in sorted(r.options.items())}
    return {
        "dataset": r.dataset or r.name,
        "format": r.fmt,
        "options": options,
        "sources": {f"{role}:{p.name}": sha256_file(p) for role, p in sorted(r.files.items())},
    }


def import_city(store, name_or_path: str | Path, *, fmt: str | None = None,
                options: dict[str, Any] | None = None,
                data_dir: str | Path | None = None) -> tuple[str, City, bool]:
    """Import a named dataset or a path into ``store``; returns (artifact id, city, skipped).

    ``skipped`` is True when the same source files (by SHA-256) and options were already
    imported: the stored city is read back instead of parsing the files again.
    A name ``synth:key=value:...`` is a synthetic city (``stgray.data.synthetic``),
    generated from its parameters instead of read from files.
    """
    from stgray.data import synthetic

    if synthetic.is_synthetic(str(name_or_path)):  # "synth:nodes=1000:seed=0": generated
        if fmt or options:
            from stgray.errors import DataError

            raise DataError("a synthetic city takes no format or file options (its name holds "
                            "its parameters)", where=str(name_or_path))
        return synthetic.import_synthetic(store, str(name_or_path))
    r = resolve(name_or_path, fmt=fmt, options=options, data_dir=data_dir)
    config = city_config(r)
    aid = store.id_for(CITY_KIND, config)
    if store.exists(aid):
        return aid, read_city(store, aid), True
    city = r.load()
    with store.writer(CITY_KIND, config, label=city.name, meta=city.summary()) as w:
        write_city(w, city)
    return aid, city, False
