"""The facts a benchmark result needs next to it to mean anything."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata
from typing import Any

import torch

from paca.backend_abc import Backend


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (a shared, busy machine makes timings noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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
        "versions": {
            name: _version(name)
            for name in ("paca", "torch", "transformers", "peft", "accelerate", "numpy")
        },
        "backend": backend.describe(),
        # PaCA's effective-weight cache changes speed and memory; record how it was set
        "env": {k: os.environ.get(k) for k in ("PACA_WEIGHT_CACHE", "OMP_NUM_THREADS")},
    }
