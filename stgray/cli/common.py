"""Options and output helpers shared by the CLI sub-commands."""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import typer

StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", help="Store URL: a path, file:// or s3://bucket/prefix "
                    "(default $STGRAY_STORE or ./stgray-store). S3 endpoint and keys come from "
                    "STGRAY_S3_ENDPOINT/AWS_ENDPOINT_URL and the AWS_* variables.")]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """A plain fixed-width text table (also valid Markdown)."""
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    if title:
        out.insert(0, title)
    return "\n".join(out)


def print_table(rows: list[dict[str, Any]], title: str | None = None, empty: str = "") -> None:
    typer.echo(format_table(rows, title) if rows else empty)
