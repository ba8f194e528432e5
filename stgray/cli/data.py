"""``stgray data``: import public city datasets (or your own) into the store."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from stgray.cli.common import StoreOpt, print_table

app = typer.Typer(
    help="Import and inspect city datasets: the shared public cities by name, or your own files "
         "(METR-LA-style .h5, dataset.npy + matrix.npy, CSV/Parquet tables) into the artifact store.",
    no_args_is_help=True)

DataDirOpt = Annotated[Optional[str], typer.Option(
    "--data-dir", help="Folder holding the public datasets (default $STGRAY_DATA_DIR, else "
                       "../shared/datasets next to the repository or the current folder, else "
                       "~/.cache/stgray/datasets).")]

IMPORT_HELP = (
    "Import a dataset as a city artifact and print its summary.\n\n"
    "SOURCE is a dataset name (see 'stgray data list'), 'all' for the five shared datasets, "
    "or a path to your own files:\n\n"
    "\b\n"
    "  metr-la.h5 --graph adj_mx.pkl    HDF5 frame + DCRNN graph\n"
    "  DIR --step 5min                  dataset.npy + matrix.npy\n"
    "  series.csv --graph adj.csv       timestamp + node columns\n"
    "  series.parquet --coords xy.csv   ... with a kNN graph\n\n"
    "--graph takes a square adjacency CSV (optional header/index), an edge list CSV "
    "(source,target[,weight]; a weight column named distance/cost becomes the similarity "
    "exp(-(d/sigma)^2)), a .npy matrix or a DCRNN adj_mx.pkl (read with a restricted unpickler). "
    "--coords takes node_id,lat,lon. Self loops are dropped (models add their own).\n\n"
    "Importing the same files with the same options again is skipped: the artifact is found "
    "by the files' SHA-256."
)


def _options(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@app.command("import", help=IMPORT_HELP)
def import_(
    source: str = typer.Argument(..., help="Dataset name, 'all', or a file/folder path."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Force a format: nyc, hangzhou, montevideo, los, "
                                                              "hdf5, npy, table (default: detected)."),
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    graph: Optional[str] = typer.Option(None, "--graph", help="Graph file for your own series (see above)."),
    coords: Optional[str] = typer.Option(None, "--coords", help="node_id,lat,lon CSV: stored as coordinates; "
                                                                 "builds a kNN graph when --graph is not given."),
    step: Optional[str] = typer.Option(None, "--step", help="Time step when the files have no timestamps "
                                                             "(e.g. 300, 5min, 1h)."),
    start: Optional[str] = typer.Option(None, "--start", help="First timestamp for files without timestamps "
                                                               "(default 1970-01-01)."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Neighbours per node of the kNN graph from "
                                                             "--coords (default 8)."),
    feature: Optional[str] = typer.Option(None, "--feature", help="Feature name(s), comma separated "
                                                                   "(default value; speed for .h5)."),
    unit: Optional[str] = typer.Option(None, "--unit", help="Unit(s), e.g. mph, trips/h."),
    aggregation: Optional[str] = typer.Option(None, "--aggregation",
                                              help="How to resample: sum (counts) or mean (speeds, rates)."),
    zeros: Optional[str] = typer.Option(None, "--zeros", help="'values' (true zeros, e.g. flows) or 'missing' "
                                                               "(zeros mark gaps, e.g. METR-LA speed)."),
    key: Optional[str] = typer.Option(None, "--key", help="Array key (.npz) or frame key (.h5)."),
    time_column: Optional[str] = typer.Option(None, "--time-column", help="Timestamp column of a table."),
    name: Optional[str] = typer.Option(None, "--name", help="City name (default: dataset name or file stem)."),
    download: bool = typer.Option(False, "--download", help="Fetch a named dataset from its public origin "
                                                             "(HTTPS) when it is not found locally."),
) -> None:
    from stgray.data import sources
    from stgray.data.ingest import import_city
    from stgray.errors import DataError
    from stgray.store import ArtifactStore

    names = list(sources.DATASETS) if source == "all" else [source]
    opts = _options(graph=graph, coords=coords, step=step, start=start, k=k, feature=feature, unit=unit,
                    aggregation=aggregation, zeros=zeros, key=key, time_column=time_column, name=name)
    if source == "all" and (opts or fmt):
        raise DataError("'all' takes no format or per-dataset options", field="source")
    if download:
        for n in names:
            if n not in sources.DATASETS:
                raise DataError("--download works for dataset names only", where=n, field="download")
            if not sources.is_local(n, data_dir):
                dest = sources.download(n, sources.default_download_dir(data_dir))
                data_dir = str(dest)
                typer.echo(f"downloaded {n} into {dest}", err=True)
    st = ArtifactStore(store)
    rows = []
    for n in names:
        aid, city, skipped = import_city(st, n, fmt=fmt, options=opts, data_dir=data_dir)
        rows.append({"id": aid, "status": "skipped (in store)" if skipped else "imported", **city.summary()})
    print_table(rows, title=f"cities in {st.url}")


@app.command("list")
def list_(data_dir: DataDirOpt = None) -> None:
    """List the named public datasets: shape, step, origin, licence and whether found locally."""
    from stgray.data import sources

    base = sources.resolve_data_dir(data_dir)
    rows = []
    for spec in sources.DATASETS.values():
        rows.append({"name": spec.name, "shape": spec.shape, "step": spec.step,
                     "origin": spec.origin, "licence": spec.licence,
                     "local": "yes" if sources.is_local(spec.name, data_dir) else "no"})
    print_table(rows, title=f"datasets (local folder: {base if base else 'none found'})")
    typer.echo("\nImport one with 'stgray data import NAME' (add --download when not local); "
               "'stgray data formats' lists the file formats for your own data.")


@app.command("formats")
def formats() -> None:
    """List the file formats 'stgray data import PATH' reads."""
    from stgray.data.importers import FORMATS

    print_table([{"format": f.name, "reads": f.description} for f in FORMATS.values()])


@app.command("show")
def show(artifact_id: str = typer.Argument(..., help="city/<key> as printed by 'data import' or 'store ls'."),
         store: StoreOpt = None,
         as_json: bool = typer.Option(False, "--json", help="Print the full metadata as JSON.")) -> None:
    """Print a stored city's summary and provenance (files, checksums, origin, conversion notes)."""
    from stgray.data.city import CITY_KIND
    from stgray.errors import DataError
    from stgray.store import ArtifactStore

    st = ArtifactStore(store)
    m = st.manifest(artifact_id)
    if m.kind != CITY_KIND:
        raise DataError(f"artifact is a '{m.kind}', not a city", where=artifact_id)
    meta = st.read_json(artifact_id, "meta.json", m)
    if as_json:
        typer.echo(json.dumps({"id": m.id, "summary": m.meta, "config": m.config, **meta}, indent=1, default=str))
        return
    order = ["name", "steps", "nodes", "features", "step", "start", "days", "edges", "min", "max", "zeros%"]
    summary = {k: m.meta[k] for k in order if k in m.meta} | {k: v for k, v in m.meta.items() if k not in order}
    print_table([{"id": m.id, **summary}], title=f"city {m.label} (imported {m.created})")
    prov = meta.get("provenance", {})
    typer.echo(f"\nfeatures: {', '.join(f'{f} [{u}, {a}]' for f, u, a in zip(meta['features'], meta['units'], meta['aggregation']))}")
    typer.echo(f"missing: {meta['missing']}; zeros are values: {meta['zeros_are_values']}; "
               f"coordinates: {'yes' if meta.get('has_coords') else 'no'}")
    origin = prov.get("origin", {})
    typer.echo(f"licence: {prov.get('licence', '?')}")
    files = prov.get("files", {})
    if files:
        typer.echo("")
        ofiles = origin.get("files", {})
        print_table([{"role": r, "file": f.get("name", ""), "bytes": f.get("bytes", ""),
                      "sha256": f.get("sha256", "")[:16],
                      "origin": (f"{ofiles[f['name']]['repository'].removeprefix('https://github.com/')}@"
                                 f"{ofiles[f['name']]['commit']}:{ofiles[f['name']]['path']}"
                                 if f.get("name") in ofiles else "user-supplied")}
                     for r, f in files.items()], title="source files")
    notes = prov.get("notes", [])
    if notes:
        typer.echo("\nnotes:")
        for note in notes:
            typer.echo(f"  - {note}")


@app.command("synth")
def synth(
    nodes: int = typer.Option(100, "--nodes", min=2, help="Number of nodes."),
    days: float = typer.Option(28.0, "--days", help="Length in days."),
    step: int = typer.Option(3600, "--step", help="Time step in seconds (divides a day)."),
    k: int = typer.Option(8, "--k", min=1, help="Nearest neighbours per node of the k-NN graph."),
    daily: float = typer.Option(0.8, "--daily", help="Daily seasonality amplitude (relative to the level)."),
    weekly: float = typer.Option(0.2, "--weekly", help="Weekday/weekend amplitude (relative to the level)."),
    spatial_corr: float = typer.Option(0.6, "--spatial-corr", help="Share of the noise variance shared with "
                                                                   "graph neighbours, 0..1."),
    noise: float = typer.Option(0.25, "--noise", help="Std of the multiplicative log-noise."),
    level: float = typer.Option(40.0, "--level", help="Median mean value per step."),
    counts: bool = typer.Option(True, "--counts/--rates", help="Poisson counts (default) or real rates."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same city)."),
    store: StoreOpt = None,
) -> None:
    """Generate a synthetic city (k-NN graph with Gaussian-kernel weights; daily + weekly
    seasonality x per-node scale x spatially correlated noise) into the store.

    The printed name (e.g. synth:nodes=1000:seed=3) can be used wherever a dataset name
    can -- as a source or target in a run config, or with 'data import' -- and always
    gives the same city. Generating it again is skipped.
    """
    from stgray.data.synthetic import SynthConfig, import_synthetic
    from stgray.store import ArtifactStore

    cfg = SynthConfig.from_mapping(
        {"nodes": nodes, "days": days, "step_s": step, "k": k, "daily_amplitude": daily,
         "weekly_amplitude": weekly, "spatial_corr": spatial_corr, "noise": noise, "level": level,
         "counts": counts, "seed": seed}, where="stgray data synth")
    st = ArtifactStore(store)
    aid, city, skipped = import_synthetic(st, cfg)
    print_table([{"id": aid, "status": "skipped (in store)" if skipped else "generated", **city.summary()}],
                title=f"synthetic city in {st.url}")
    typer.echo(f"\nuse it as a source or target by name: '{city.name}'")
