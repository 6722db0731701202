"""Per-optimizer-step effective weights: write ``W[:, idx] + delta`` once per step.

``delta`` changes only when an optimizer steps, yet the plain op rebuilds the effective
weight (a full copy of W with r columns changed) in every forward and again in every
backward. With the cache on, each PaCA layer keeps one effective-weight tensor and
rewrites only its ``r`` columns when ``delta`` has changed; forwards and backwards in
between (gradient accumulation, evaluation, checkpoint recompute) reuse it.

Staleness is ruled out by keying each cached weight on everything it was computed from:

* the tensors' version counters (every in-place write under ``no_grad`` bumps them:
  foreach/for-loop optimizers, ``load_state_dict``, merge/unmerge, manual edits),
* their storage pointers, dtypes, shapes and strides (``.to()``, ``param.data = ...``),
* a process-wide step generation bumped by a global optimizer post-step hook, because
  fused optimizers (``AdamW(fused=True)``) and ``.data``-based optimizers change
  parameters without bumping version counters.

The one write nothing can see is ``delta.data.copy_(...)`` outside an optimizer step;
call :func:`invalidate` after such an edit.

The pretrained weight is never written: the cache is a separate tensor. That costs one
copy of every adapted weight (for LLaMA-3-8B with all seven projections, about 13 GiB in
bf16), which is why the cache is opt-in: ``PACA_WEIGHT_CACHE=step``, :func:`set_enabled`
or :func:`enabled`, or a backend whose ``cache_effective_weight`` attribute is true.
Under autocast the cached copy is already in the compute dtype (rounded as the per-call
path rounds), so fp32 master weights under bf16 autocast cost half a copy. The cache is
bypassed (the per-call path is used) while ``torch.compile`` traces and during CUDA graph
capture, where Python-side bookkeeping cannot run at replay time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend

#: Environment switch: ``step`` (cache, one column write per optimizer step) or ``call``
#: (rebuild per call). Unset: the backend's ``cache_effective_weight`` attribute decides.
POLICY_ENV = "PACA_WEIGHT_CACHE"
_ON = {"step", "1", "true", "on", "yes"}
_OFF = {"call", "0", "false", "off", "no"}

_override: ContextVar[bool | None] = ContextVar("paca_weight_cache", default=None)
_global: bool | None = None
_generation = 0
_hook: Any = None
_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class CacheStats:
    """Counters that show what the cache did (tests and benchmarks read them)."""

    hits: int = 0
    column_writes: int = 0
    rebuilds: int = 0


_stats = CacheStats()


@dataclass
class _Entry:
    w_eff: torch.Tensor | None
    base_key: tuple[Any, ...]
    delta_key: tuple[Any, ...]


def _policy_from_env() -> bool | None:
    raw = os.environ.get(POLICY_ENV, "").strip().lower()
    if not raw:
        return None
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ValueError(f"{POLICY_ENV}={raw!r} is not understood; use 'step' (cache) or 'call'")


def is_enabled(backend: Backend | None = None) -> bool:
    """Whether PaCA layers computed by ``backend`` use the cache right now."""
    ctx = _override.get()
    if ctx is not None:
        return ctx
    if _global is not None:
        return _global
    env = _policy_from_env()
    if env is not None:
        return env
    return bool(getattr(backend, "cache_effective_weight", False))


def set_enabled(value: bool | None) -> None:
    """Turn the cache on/off for the process (``None``: back to env/backend default)."""
    global _global
    _global = value
    if value is False:
        clear()


@contextlib.contextmanager
def enabled(value: bool = True) -> Iterator[None]:
    """Turn the cache on (or off) inside a ``with`` block (this thread/context only)."""
    token = _override.set(value)
    try:
        yield
    finally:
        _override.reset(token)


def invalidate() -> None:
    """Force every cached weight to rewrite its columns on next use (after a ``.data`` edit)."""
    global _generation
    _generation += 1


def clear() -> None:
    """Drop every cached effective weight (frees one weight copy per adapted layer)."""
    _entries.clear()


def stats() -> CacheStats:
    """A copy of the counters since the last :func:`reset_stats`."""
    return CacheStats(_stats.hits, _stats.column_writes, _stats.rebuilds)


def reset_stats() -> None:
    _stats.hits = _stats.column_writes = _stats.rebuilds = 0


def cached_bytes() -> int:
    """Device bytes the cache holds now (the memory cost of turning it on)."""
    total = 0
    for entry in list(_entries.values()):
        if entry.w_eff is not None:
            total += entry.w_eff.numel() * entry.w_eff.element_size()
    return total


def _after_optimizer_step(*_: Any) -> None:
    invalidate()


def _install_hook() -> None:
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def lookup(
    backend: Backend,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """The up-to-date effective weight for this layer, or None to compute it per call.

    Builds the cached tensor on first use, rewrites only the ``r`` columns when just
    ``delta`` (or the step generation) changed, and rebuilds it when ``weight`` or
    ``idx`` changed (their old columns would otherwise linger). With ``dtype`` (the
    autocast compute dtype) the cache holds the effective weight already cast to it,
    rounded exactly as the per-call path rounds (to ``weight.dtype``, then to ``dtype``),
    so fp32 master weights under bf16 autocast cost half a copy and no cast per call.
    """
    if torch.compiler.is_compiling() or not is_enabled(backend) or _capturing(weight):
        return None
    _install_hook()
    dtype = dtype if dtype is not None else weight.dtype
    base_key = (_tensor_key(weight), _tensor_key(idx), dtype)
    delta_key = (_tensor_key(delta), _generation)
    entry: _Entry | None = _entries.get(delta)
    if entry is not None and entry.w_eff is not None and entry.base_key == base_key:
        if entry.delta_key == delta_key:
            _stats.hits += 1
            return entry.w_eff
        with torch.no_grad():
            _write_columns(backend, entry.w_eff, weight, idx, delta)
        entry.delta_key = delta_key
        _stats.column_writes += 1
        return entry.w_eff
    if entry is not None:
        entry.w_eff = None  # free the stale copy before building the new one
    with torch.no_grad():
        w_eff = backend.effective_weight(weight, idx, delta).to(dtype)
    _entries[delta] = _Entry(w_eff, base_key, delta_key)
    _stats.rebuilds += 1
    return w_eff


def _write_columns(
    backend: Backend,
    w_eff: torch.Tensor,
    weight: torch.Tensor,
    idx: torch.Tensor,
    delta: torch.Tensor,
) -> None:
    """``w_eff[:, idx] = round(W[:, idx] + delta)``, bit-identical to ``effective_weight``
    (followed by the cast to ``w_eff.dtype`` when the cache holds a compute-dtype copy)."""
    fused = getattr(backend, "write_effective_columns", None)
    if fused is not None and w_eff.dtype == weight.dtype:
        fused(w_eff, weight, idx, delta)
        return
    columns = weight.index_select(1, idx).float() + delta.float()
    backend.write_columns(w_eff, idx, columns.to(weight.dtype))
