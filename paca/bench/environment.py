"""The facts a benchmark result needs next to it to mean anything."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any

import torch

from paca.backend_abc import Backend
from paca.environment import cpu_model, library_versions, load_average, total_memory_bytes

__all__ = ["cpu_model", "environment", "load_average", "total_memory_bytes"]


def environment(backend: Backend) -> dict[str, Any]:
    """Versions, machine, threads and backend description."""
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": total_memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "versions": library_versions(
            ("paca", "torch", "transformers", "peft", "accelerate", "numpy")
        ),
        "backend": backend.describe(),
        # settings that change which kernels run or how many threads they get
        "env": {
            k: os.environ.get(k)
            for k in ("PACA_BACKEND", "PACA_CUDA_KERNELS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
    }
