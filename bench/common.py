"""What every benchmark records about where it ran."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    import numpy
    import torch

    try:
        import ray

        ray_v = ray.__version__
    except ImportError:  # pragma: no cover
        ray_v = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": numpy.__version__, "ray": ray_v, "loadavg": os.getloadavg(),
            "cuda": torch.cuda.is_available()}
