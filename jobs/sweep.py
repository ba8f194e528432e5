"""Ray job: a sweep (stgray sweep run --report): resumes the same experiment when it
exists, then writes the report (winner evaluated once on test).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python -m jobs.sweep configs/sweep_stgp.yaml
"""

import sys


def main() -> int:
    from stgray.cli.main import main as cli

    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: python -m jobs.sweep SWEEP_CONFIG [stgray sweep run options]", file=sys.stderr)
        return 2
    args = sys.argv[1:]
    return cli(["sweep", "run", *args] + ([] if "--no-report" in args or "--report" in args else ["--report"]))


if __name__ == "__main__":
    sys.exit(main())
