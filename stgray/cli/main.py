"""The ``stgray`` command. User mistakes print one line and exit non-zero, no traceback."""

from __future__ import annotations

import logging
import os
import sys

import typer

from stgray.cli import data as data_cmd
from stgray.cli import store as store_cmd
from stgray.errors import StgrayError

app = typer.Typer(
    name="stgray",
    help="Spatio-temporal graph transfer learning between cities (GPDiff, STGP) on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cmd.app, name="data")
app.add_typer(store_cmd.app, name="store")


def _register_optional() -> None:
    """Sub-commands of later stages register themselves here when their module exists."""
    import importlib

    for mod, name in [("stgray.cli.gpdiff", "gpdiff"), ("stgray.cli.stgp", "stgp"),
                      ("stgray.cli.sweep", "sweep")]:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        app.add_typer(m.app, name=name)
    try:
        run_cmd = importlib.import_module("stgray.cli.run")
    except ModuleNotFoundError as e:
        if e.name != "stgray.cli.run":
            raise
    else:
        app.command("run")(run_cmd.run)


_register_optional()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("STGRAY_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        app(args=argv, standalone_mode=False)
    except StgrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
