"""``stgray store``: look into the artifact store (local folder or S3)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from stgray.cli.common import StoreOpt, print_table
from stgray.store import ArtifactStore

app = typer.Typer(help="Inspect the artifact store: list, show, verify, serve a local S3.",
                  no_args_is_help=True)


@app.command("ls")
def ls(kind: Optional[str] = typer.Argument(None, help="Only this kind (city, zoo, tokens, ...)."),
       store: StoreOpt = None) -> None:
    """List committed artifacts with their lineage (the artifacts they were made from)."""
    st = ArtifactStore(store)
    rows = [{"id": m.id, "label": m.label, "created": m.created, "MB": round(m.total_bytes / 1e6, 2),
             "inputs": ",".join(m.inputs) or "-"} for m in st.ls(kind)]
    print_table(rows, title=f"artifacts in {st.url}", empty="(no artifacts)")


@app.command("show")
def show(artifact_id: str = typer.Argument(..., help="kind/key as printed by 'store ls'."),
         store: StoreOpt = None) -> None:
    """Print an artifact's manifest: config, inputs, files with sizes and checksums."""
    m = ArtifactStore(store).manifest(artifact_id)
    typer.echo(json.dumps(m.model_dump(), indent=1))


@app.command("verify")
def verify(artifact_id: Optional[str] = typer.Argument(None, help="One artifact; all if left out."),
           store: StoreOpt = None) -> None:
    """Re-read objects and check sizes and SHA-256 against their manifests."""
    st = ArtifactStore(store)
    ids = [artifact_id] if artifact_id else [m.id for m in st.ls()]
    for i in ids:
        m = st.verify(i)
        typer.echo(f"ok  {i}  {len(m.files)} objects, {m.total_bytes} bytes")


@app.command("serve")
def serve(directory: str = typer.Option("./s3-data", help="Where SeaweedFS keeps its files."),
          port: int = typer.Option(8333, help="S3 port on 127.0.0.1."),
          bucket: str = typer.Option("stgray", help="Bucket created at start.")) -> None:
    """Run a local S3 server (SeaweedFS) for trying the S3 store on a laptop."""
    import os
    import time
    from pathlib import Path

    from stgray.store.seaweed import SeaweedS3

    key = os.environ.get("AWS_ACCESS_KEY_ID", "stgray-local")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "stgray-local-secret")
    srv = SeaweedS3(Path(directory).resolve(), bucket=bucket, port=port, access_key=key,
                    secret_key=secret).start()
    typer.echo(f"S3 on {srv.endpoint}, bucket '{bucket}'. Use:\n"
               f"  export STGRAY_S3_ENDPOINT={srv.endpoint} STGRAY_STORE=s3://{bucket}/stgray\n"
               "  (and the same AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Ctrl-C stops.")
    try:
        while srv.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
