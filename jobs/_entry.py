"""Shared body of the job entrypoints: the pipeline through one stage, via the real CLI."""

from __future__ import annotations

import sys


def main(until: str | None) -> int:
    from stgray.cli.main import main as cli

    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(f"usage: python -m {sys.modules['__main__'].__spec__.name} CONFIG [stgray run options]",
              file=sys.stderr)
        return 2
    args = ["run", *sys.argv[1:]] + (["--until", until] if until else [])
    return cli(args)
