"""Ray job: the pipeline through the zoo stage (earlier stages skipped when in the store)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("zoo"))
