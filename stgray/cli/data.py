"""``stgray data``: import public city datasets (or your own) into the store."""

from __future__ import annotations

import typer

app = typer.Typer(help="Import and inspect city datasets.", no_args_is_help=True)
