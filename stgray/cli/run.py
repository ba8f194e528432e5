"""``stgray run CONFIG``: the pipeline, skipping stages already in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stgray.cli.common import StoreOpt, print_table


def run(config: Path = typer.Argument(..., help="Pipeline config (YAML), e.g. configs/quickstart.yaml."),
        stages: Optional[str] = typer.Option(None, help="Comma-separated subset of stages to run."),
        store: StoreOpt = None,
        data_dir: Optional[str] = typer.Option(None, help="Datasets folder (default $STGRAY_DATA_DIR "
                                                          "or ../shared/datasets)."),
        until: Optional[str] = typer.Option(None, help="Run the pipeline through this stage only."),
        out: Optional[Path] = typer.Option(None, help="Also copy the report (Markdown + plots) here.")) -> None:
    """Run import -> prepare -> zoo -> tokens -> diffusion -> GPDiff transfer -> STGP ->
    baselines -> report (the config's `stages`; done stages are skipped); prints the results table."""
    from stgray.pipeline import PipelineConfig, run_pipeline
    from stgray.eval.report import results_markdown

    cfg = PipelineConfig.load(config)
    upd = {}
    if stages:
        upd["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    if store:
        upd["store"] = store
    if data_dir:
        upd["data_dir"] = data_dir
    if upd:
        cfg = PipelineConfig.from_mapping({**cfg.model_dump(mode="json"), **upd}, where=str(config))
    res = run_pipeline(cfg, until=until)
    typer.echo("")
    print_table(res["stages"], title="stages")
    typer.echo("")
    if res["rows"]:
        typer.echo(f"results on {cfg.target} (test, de-normalised; selection on validation)")
        typer.echo(results_markdown(res["rows"]))
    if "report" in res:
        typer.echo(f"\nreport: {res['store']}/{res['report']} (stgray store show {res['report']})")
        if out:
            from stgray.store import ArtifactStore

            st = ArtifactStore(res["store"])
            out.mkdir(parents=True, exist_ok=True)
            for name in st.manifest(res["report"]).files:
                (out / name).write_bytes(st.read_bytes(res["report"], name))
            typer.echo(f"report copied to {out}/report.md")
