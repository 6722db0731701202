"""The longest sequence each method can train under a memory budget.

On a device with an allocator peak counter the answer is searched for: train one
step at a length, see whether it fits (no out-of-memory error and a peak within the
budget), and bisect. On CPU, where running out of memory means swapping or being
killed, it is computed instead: the peak measured at several lengths is fitted as
``peak = fixed + per_token * tokens`` and solved for the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``; returns ``(a, b, worst relative residual)``."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError("fitting bytes per token needs memory probes at two or more lengths")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    worst = max(abs(a + b * x - y) / y for x, y in zip(xs, ys, strict=True) if y)
    return a, b, worst


def max_seq_from_fit(fixed: float, per_token: float, budget: int, batch: int) -> int:
    """Largest sequence length with ``fixed + per_token * batch * seq <= budget``."""
    if per_token <= 0:
        raise ValueError(f"memory did not grow with sequence length (slope {per_token:.1f} B)")
    return max(0, int((budget - fixed) // (per_token * batch)))


def computed_max_seq(probes: Sequence[dict[str, Any]], budget: int, batch: int) -> dict[str, Any]:
    """Max sequence length from memory probes at several lengths (the CPU path).

    The forward+backward peak (``peak_fwd_bwd_bytes``) is fitted linearly in tokens;
    the optimizer-step peak does not depend on the length and only has to fit as is.
    """
    xs = [float(p["tokens"]) for p in probes]
    ys = [float(p["peak_fwd_bwd_bytes"]) for p in probes]
    fixed, per_token, worst = fit_linear(xs, ys)
    optimizer_peak = max(int(p["peak_optimizer_bytes"]) for p in probes)
    max_seq = max_seq_from_fit(fixed, per_token, budget, batch)
    return {
        "how": "computed",
        "budget_bytes": budget,
        "fixed_bytes": fixed,
        "bytes_per_token": per_token,
        "fit_worst_relative_residual": worst,
        "optimizer_peak_bytes": optimizer_peak,
        "max_seq": max_seq if optimizer_peak <= budget else 0,
        "probe_tokens": xs,
        "probe_fwd_bwd_peaks": ys,
    }


def searched_max_seq(
    fits: Callable[[int], bool], start: int, granularity: int, upper: int
) -> dict[str, Any]:
    """Max sequence length (a multiple of ``granularity``) for which ``fits`` holds.

    Doubles from ``start`` until a length does not fit (or ``upper`` is reached), then
    bisects. ``fits`` must be monotone: if a length fits, every shorter one does.
    """
    g = max(1, granularity)
    tried: dict[int, bool] = {}

    def check(n: int) -> bool:
        if n not in tried:
            tried[n] = fits(n)
        return tried[n]

    lo, hi = 0, None
    n = max(g, (start // g) * g)
    while n <= upper:
        if check(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if hi is None:
        return {"how": "searched", "max_seq": lo, "capped_at": upper, "tried": tried}
    while hi - lo > g:
        mid = ((lo + hi) // 2 // g) * g
        if mid <= lo:
            break
        if check(mid):
            lo = mid
        else:
            hi = mid
    return {"how": "searched", "max_seq": lo, "capped_at": None, "tried": tried}
