"""The facts a benchmark result needs next to it to mean anything.

They are paca's one environment record (:func:`paca.environment.record`, the same facts
``paca run`` writes to ``environment.json``) under the key names of ``bench.json``'s
schema (``paca-bench/1``): ``timestamp_utc``, ``versions``, ``backend`` (the backend's
``describe()``), ``load_average_start``, ``env``; the other facts keep the record's names.
"""

from __future__ import annotations

from typing import Any

from paca.backend_abc import Backend
from paca.environment import cpu_model, load_average, record, total_memory_bytes

__all__ = ["cpu_model", "environment", "load_average", "total_memory_bytes"]

#: The record's key -> its name in ``bench.json``.
BENCH_NAMES = {
    "started": "timestamp_utc",
    "libraries": "versions",
    "describe": "backend",
    "load_average": "load_average_start",
    "settings": "env",
}
#: Left out: the backend's name is in its description, and the command line says less
#: than ``bench.json``'s ``config``, which holds every setting of the run.
LEFT_OUT = ("backend", "command")


def environment(backend: Backend) -> dict[str, Any]:
    """Versions, machine, threads, settings and backend description, for ``bench.json``."""
    facts = {k: v for k, v in record(backend).items() if k not in LEFT_OUT}
    return {BENCH_NAMES.get(k, k): v for k, v in facts.items()}
