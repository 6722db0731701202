"""Per-method measurements: interleaved step timing and one-step memory probes."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from paca.backend_abc import Backend
from paca.bench.memory import (
    AllocationTracker,
    SavedActivationCounter,
    model_tensors,
    optimizer_state_bytes,
    unique_storage_bytes,
)
from paca.bench.methods import MethodSetup, train_step


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of timing samples (seconds)."""
    xs = sorted(samples)
    n = len(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if n >= 2 else [xs[0]] * 3
    return {
        "samples": list(samples),
        "n": n,
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q[0],
        "q3": q[2],
        "iqr": q[2] - q[0],
        "stdev": statistics.stdev(xs) if n >= 2 else 0.0,
    }


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """Per-round ratios ``a[k] / b[k]`` of two methods' steps timed in the same round.

    The two steps of a round ran seconds apart, so load from elsewhere mostly hits both:
    the median of the per-round ratios, with its spread, is the comparison to quote on a
    shared machine (a ratio of medians mixes quiet and busy rounds). ``ratio_of_minima``
    compares each method's least-disturbed step.
    """
    pairs = [x / y for x, y in zip(a, b, strict=False) if y]
    if not pairs:
        return None
    stats = summarize(pairs)
    return {
        "per_round": pairs,
        "rounds": len(pairs),
        "median": stats["median"],
        "q1": stats["q1"],
        "q3": stats["q3"],
        "iqr": stats["iqr"],
        "min": stats["min"],
        "max": stats["max"],
        "rounds_below_1": sum(r < 1 for r in pairs),
        "ratio_of_minima": min(a) / min(b) if min(b) else None,
    }


def interleaved_times(
    setups: Sequence[MethodSetup],
    input_ids: torch.Tensor,
    backend: Backend,
    warmup: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time training steps round-robin over methods so machine noise hits all alike.

    Round ``k`` starts at method ``k mod n`` (the order rotates, so no method is always
    first after a pause). Warm-up rounds run the same way and are recorded separately,
    never in the statistics. Each step is timed from before ``zero_grad`` to after
    ``optimizer.step`` and a device synchronize. Python's garbage collector runs once
    before each round and is off inside timed steps (as ``timeit`` does), so a
    collection never lands in one method's measurement.
    """
    warm: dict[str, list[float]] = {s.name: [] for s in setups}
    timed: dict[str, list[float]] = {s.name: [] for s in setups}
    n = len(setups)
    for rnd in range(warmup + repeats):
        order = [setups[(rnd + i) % n] for i in range(n)]
        gc.collect()
        for setup in order:
            backend.synchronize()
            gc.disable()
            try:
                start = time.perf_counter()
                train_step(setup, input_ids)
                backend.synchronize()
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            (warm if rnd < warmup else timed)[setup.name].append(elapsed)
            if progress is not None:
                progress(setup.name)
    tokens = int(input_ids.numel())
    out: dict[str, dict[str, Any]] = {}
    for name, samples in timed.items():
        stats = summarize(samples)
        stats["warmup_samples"] = warm[name]
        stats["tokens_per_s"] = tokens / stats["median"]
        out[name] = stats
    return out


@dataclass
class MemoryProbe:
    """What one training step at one sequence length holds in memory."""

    seq: int
    tokens: int
    saved_activation_bytes: int
    saved_in_target_layers: int
    saved_elsewhere: int
    per_layer: dict[str, dict[str, Any]]
    static_bytes: int
    optimizer_state_bytes: int
    transient_peak_bytes: int
    peak_bytes: int
    #: Peak through the forward pass: every saved activation is alive at its end.
    peak_forward_bytes: int
    #: Peak through forward and backward (activations, gradients): grows with tokens.
    peak_fwd_bwd_bytes: int
    #: Peak during ``optimizer.step`` (gradients, optimizer temporaries): does not.
    peak_optimizer_bytes: int
    peak_source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def static_bytes(setup: MethodSetup) -> int:
    """Parameters, buffers and optimizer state: memory held between steps."""
    tensors = model_tensors(setup.model)
    if setup.optimizer is not None:
        tensors += [
            v for st in setup.optimizer.state.values() for v in st.values() if torch.is_tensor(v)
        ]
    return unique_storage_bytes(tensors)


def probe_memory(setup: MethodSetup, input_ids: torch.Tensor, backend: Backend) -> MemoryProbe:
    """One full training step with saved-tensor counting and peak tracking on.

    Run after at least one step so optimizer state exists (steady state). The peak
    comes from the backend's allocator when it reports one (CUDA, HPU), else from
    :class:`AllocationTracker` plus the static bytes held before the step.
    """
    opt = setup.optimizer
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    backend.synchronize()
    static = static_bytes(setup)
    counter = SavedActivationCounter(model_tensors(setup.model), setup.target_layers)
    device_peak = backend.max_memory_allocated() is not None
    tracker = None if device_peak else AllocationTracker()
    before = 0
    if device_peak:
        backend.reset_peak_memory()
        before = int(backend.memory_allocated() or 0)

    def phase_peak() -> int:
        """Absolute peak since the last call, then start a new window."""
        if tracker is not None:
            value = static + tracker.peak
            tracker.reset_peak()
            return value
        value = int(backend.max_memory_allocated() or 0)
        backend.reset_peak_memory()
        return value

    if tracker is not None:
        tracker.__enter__()
    try:
        with counter.count():
            out = setup.model(input_ids=input_ids, labels=input_ids)
        backend.synchronize()
        forward = phase_peak()
        out.loss.backward()
        del out
        backend.synchronize()
        fwd_bwd = max(forward, phase_peak())
        if opt is not None:
            opt.step()
        backend.synchronize()
        opt_peak = phase_peak() if opt is not None else 0
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    peak = max(fwd_bwd, opt_peak)
    source = "cpu-dispatch-tracker" if tracker is not None else f"{backend.name}-allocator"
    transient = peak - (static if tracker is not None else before)
    in_layers = sum(rec.saved_bytes for rec in counter.per_layer.values())
    return MemoryProbe(
        seq=int(input_ids.shape[1]),
        tokens=int(input_ids.numel()),
        saved_activation_bytes=counter.total_bytes,
        saved_in_target_layers=in_layers,
        saved_elsewhere=counter.other_bytes,
        per_layer={name: asdict(rec) for name, rec in counter.per_layer.items()},
        static_bytes=static,
        optimizer_state_bytes=optimizer_state_bytes(opt),
        transient_peak_bytes=int(transient),
        peak_bytes=int(peak),
        peak_forward_bytes=int(forward),
        peak_fwd_bwd_bytes=int(fwd_bwd),
        peak_optimizer_bytes=int(opt_peak),
        peak_source=source,
    )
