"""stgray: spatio-temporal graph transfer learning between cities (GPDiff, STGP) on Ray."""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait for a descheduled sibling waste whole time
# slices whenever a core is shared (Ray's own processes, other workers): measured 15-20x
# slower small-model training steps with 2 torch threads on a busy 2-core machine, and
# none with PASSIVE. It must be set before torch loads libgomp; Ray's local processes
# inherit it from here, cluster jobs get it from jobs/runtime_env.yaml.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
