"""Ray job: the whole pipeline (stages already in the store are skipped)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main(None))
