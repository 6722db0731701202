"""Run the whole benchmark: build every method, time it, probe memory, compare."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch

from paca.backend_abc import Backend
from paca.bench.config import BenchConfig
from paca.bench.environment import environment, load_average
from paca.bench.measure import interleaved_times, probe_memory
from paca.bench.methods import DESCRIPTIONS, MethodSetup, build_method, make_batch, train_step
from paca.bench.seqlen import computed_max_seq, searched_max_seq

SCHEMA = "paca-bench/1"

#: Targets from the issue: (metric, comparison, reference method, threshold).
TARGETS: list[dict[str, Any]] = [
    {"metric": "saved_activation_bytes", "vs": "frozen", "op": "within", "value": 0.02},
    {"metric": "saved_activation_bytes", "vs": "lora", "op": "<=", "value": 0.76},
    {"metric": "step_time_s", "vs": "lora", "op": "<", "value": 1.0},
    {"metric": "max_seq", "vs": "lora", "op": ">=", "value": 1.2},
]

Progress = Callable[[str, int], None]


def resolve_backend(name: str | None) -> Backend:
    """The backend called ``name``, or the selected one (explicit > PACA_BACKEND > auto)."""
    from paca._registry import registry

    reg = registry()
    return reg.instance(name) if name not in (None, "auto") else reg.current()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _fits_on_device(
    setup: MethodSetup, config: BenchConfig, backend: Backend
) -> Callable[[int], bool]:
    def fits(seq: int) -> bool:
        ids = make_batch(config, seq, backend.device())
        gc.collect()
        backend.reset_peak_memory()
        try:
            train_step(setup, ids)
            backend.synchronize()
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            ok = False
        else:
            ok = (backend.max_memory_allocated() or 0) <= config.budget_bytes
        if setup.optimizer is not None:
            setup.optimizer.zero_grad(set_to_none=True)
        del ids
        gc.collect()
        return ok

    return fits


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def metric_values(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The headline number of every metric per method (what ratios compare)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, m in methods.items():
        out[name] = {
            "step_time_s": m["step_time_s"]["median"],
            "tokens_per_s": m["step_time_s"]["tokens_per_s"],
            "saved_activation_bytes": m["memory"]["saved_activation_bytes"],
            "peak_bytes": m["memory"]["peak_bytes"],
            "optimizer_state_bytes": m["memory"]["optimizer_state_bytes"],
            "max_seq": m["max_seq_len"]["max_seq"],
        }
    return out


def ratios(methods: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Every metric of every method divided by ``reference``'s (None when absent)."""
    values = metric_values(methods)
    ref = values.get(reference)
    if ref is None:
        return {}
    return {name: {k: _ratio(v, ref[k]) for k, v in vals.items()} for name, vals in values.items()}


def check_targets(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each issue target with the measured PaCA ratio and whether it was met."""
    results = []
    for target in TARGETS:
        ref = target["vs"]
        row = {**target, "measured": None, "met": None}
        if "paca" in methods and ref in methods:
            ratio = ratios(methods, ref)["paca"][target["metric"]]
            row["measured"] = ratio
            if ratio is not None:
                if target["op"] == "within":
                    row["met"] = abs(ratio - 1.0) <= target["value"]
                elif target["op"] == "<=":
                    row["met"] = ratio <= target["value"]
                elif target["op"] == "<":
                    row["met"] = ratio < target["value"]
                else:
                    row["met"] = ratio >= target["value"]
        results.append(row)
    return results


def _timing_spread_overlap(methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Paired per-round comparison of PaCA and LoRA step times (same round, same noise)."""
    if "paca" not in methods or "lora" not in methods:
        return None
    p = methods["paca"]["step_time_s"]["samples"]
    q = methods["lora"]["step_time_s"]["samples"]
    pairs = [a / b for a, b in zip(p, q, strict=False) if b]
    if not pairs:
        return None
    return {
        "paca_over_lora_per_round": pairs,
        "median": statistics.median(pairs),
        "rounds_paca_faster": sum(r < 1 for r in pairs),
        "rounds": len(pairs),
        # the least-disturbed step of each: robust when other work shares the machine
        "ratio_of_minima": min(p) / min(q) if min(q) else None,
    }


def run_benchmark(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every method of ``config`` and return the full result (JSON-ready).

    ``progress(label, units)`` is called as work completes (for a progress bar; see
    :func:`total_units`).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    backend = resolve_backend(config.backend)
    device = backend.device()
    env = environment(backend)
    tick = progress or (lambda label, units: None)

    setups: list[MethodSetup] = []
    for name in config.methods:
        setups.append(build_method(name, config, backend))
        tick(f"build {name}", 1)

    ids = make_batch(config, config.seq, device)
    times = interleaved_times(
        setups, ids, backend, config.warmup, config.repeats, lambda n: tick(f"time {n}", 1)
    )

    device_peak = backend.max_memory_allocated() is not None
    methods: dict[str, dict[str, Any]] = {}
    for setup in setups:
        if config.warmup == 0:  # optimizer state must exist before the steady-state probe
            train_step(setup, ids)
        probes = []
        for seq in config.probe_lengths():
            probes.append(probe_memory(setup, make_batch(config, seq, device), backend).to_dict())
            tick(f"memory {setup.name} seq {seq}", 1)
        main = next(p for p in probes if p["seq"] == config.seq)
        if device_peak:
            fits = _fits_on_device(setup, config, backend)
            seqlen = searched_max_seq(
                fits, config.seq, config.seq_granularity, config.seq_search_max
            )
            seqlen["budget_bytes"] = config.budget_bytes
        else:
            seqlen = computed_max_seq(probes, config.budget_bytes, config.batch)
        tick(f"max seq {setup.name}", 1)
        methods[setup.name] = {
            "description": DESCRIPTIONS[setup.name],
            "trainable_params": setup.trainable_params,
            "total_params": setup.total_params,
            "step_time_s": times[setup.name],
            "memory": main,
            "memory_probes": probes,
            "max_seq_len": seqlen,
        }

    env["load_average_end"] = load_average()
    result = {"schema": SCHEMA, "environment": env, "config": config.to_dict(), "methods": methods}
    return derive(result)


def derive(result: dict[str, Any], refit: bool = False) -> dict[str, Any]:
    """(Re)compute everything derived from the raw measurements in ``result``: ratios,
    the paired PaCA/LoRA comparison and the targets; with ``refit`` also the computed
    (CPU-path) max sequence lengths from the stored memory probes. Lets a saved
    ``bench.json`` be re-rendered after a change in the analysis, without re-measuring.
    """
    methods = result["methods"]
    if refit:
        cfg = result["config"]
        for m in methods.values():
            if m["max_seq_len"].get("how") == "computed":
                m["max_seq_len"] = computed_max_seq(
                    m["memory_probes"], cfg["budget_bytes"], cfg["batch"]
                )
    result["ratios"] = {
        "vs_lora": ratios(methods, "lora"),
        "vs_frozen": ratios(methods, "frozen"),
    }
    result["paired_paca_vs_lora"] = _timing_spread_overlap(methods)
    result["targets"] = check_targets(methods)
    return result


def total_units(config: BenchConfig) -> int:
    """How many progress units :func:`run_benchmark` reports."""
    n = len(config.methods)
    return n + n * (config.warmup + config.repeats) + n * (len(config.probe_lengths()) + 1)
