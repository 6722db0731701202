"""Benchmarks: PaCA against PEFT LoRA, full fine-tuning and the frozen-base bound.

    from paca.bench import preset, run_benchmark, write_outputs
    result = run_benchmark(preset("quick"))
    write_outputs(result, "bench-out")      # bench.json, bench.md, bench.png

Or from the shell: ``paca bench --quick``. See ``docs/benchmarks.md``. Every method is
built by :func:`apply_method`; saved activations are counted by
:class:`SavedActivationCounter` and bytes written by :func:`step_traffic`.
"""

from __future__ import annotations

from paca.bench.config import DEFAULT_TARGETS, METHODS, PRESETS, BenchConfig, preset
from paca.bench.memory import (
    AllocationTracker,
    SavedActivationCounter,
    optimizer_state_bytes,
    saved_activation_bytes,
)
from paca.bench.methods import apply_method
from paca.bench.report import markdown_report, plot_chart, write_outputs
from paca.bench.runner import SCHEMA, TARGETS, run_benchmark, total_units
from paca.bench.traffic import step_traffic

__all__ = [
    "DEFAULT_TARGETS",
    "METHODS",
    "PRESETS",
    "SCHEMA",
    "TARGETS",
    "AllocationTracker",
    "BenchConfig",
    "SavedActivationCounter",
    "apply_method",
    "markdown_report",
    "optimizer_state_bytes",
    "plot_chart",
    "preset",
    "run_benchmark",
    "saved_activation_bytes",
    "step_traffic",
    "total_units",
    "write_outputs",
]
