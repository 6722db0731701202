"""The process's environment: boolean settings, and the facts a result must carry.

* :func:`env_flag` is the one reader of boolean environment variables (``PACA_DEBUG``,
  ``PACA_DISABLE_PLUGIN_AUTOLOAD`` ...), for the core, the CLI and the backends.
* :func:`record` is the environment record of a run (``environment.json`` of
  ``paca run``): backend, device, machine, library versions, git commit. Benchmarks use
  the same facts (:mod:`paca.bench.environment`), so both name machines and versions the
  same way.

Built-in backends may import this module (it is part of the backend interface, like
:mod:`paca.backend_abc` and :mod:`paca.hookspecs`): it imports nothing else from paca.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Values of a boolean environment variable that mean "on" (case-insensitive, stripped).
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

#: Environment variables that change which kernels run or how many threads they get.
SETTINGS = ("PACA_BACKEND", "PACA_CUDA_KERNELS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: Libraries whose versions decide a run's numbers.
LIBRARIES = (
    "paca", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors",
    "numpy", "optimum-habana", "deepspeed", "triton",
)  # fmt: skip


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value (``1``, ``true``,
    ``yes``, ``on``; any case, surrounding blanks ignored). Unset or anything else: False."""
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
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


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(start: Path | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding ``start`` (default: paca's source)."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_name(backend: Any, described: dict[str, Any]) -> str:
    """A human-readable device name: the backend's own, else torch's, else the type."""
    for key in ("device_name", "name", "device"):
        if described.get(key):
            name = str(described[key])
            if backend.device_type == "cpu" and name in {"x86_64", "aarch64", "arm64", "i386"}:
                return cpu_model() or name  # platform.processor() is only the ISA on Linux
            return name
    import torch

    if backend.device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return backend.device_type


def record(backend: Any) -> dict[str, Any]:
    """Everything about the machine and software a comparison must state, for
    ``backend`` (its ``describe()`` is recorded; an exception from it is recorded too)."""
    try:
        described = dict(backend.describe())
    except Exception as exc:  # describe() must never raise; record it if it does
        described = {"error": f"describe() raised {type(exc).__name__}: {exc}"}
    import torch

    return {
        "backend": backend.name,
        "device_type": backend.device_type,
        "device_name": device_name(backend, described),
        "describe": described,
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": total_memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "settings": {k: os.environ.get(k) for k in SETTINGS},
        "git": git_commit(),
        "command": sys.argv,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
