"""The longest sequence each method can train under a memory budget.

On a device with an allocator peak counter the answer is searched for: train one
step at a length, see whether it fits (no out-of-memory error and a peak within the
budget), and bisect. On CPU, where running out of memory means swapping or being
killed, it is computed instead: the peak measured at several lengths is fitted as
``peak = fixed + per_token * tokens`` (slope from the two longest probes) and
solved for the budget.
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


def _line_through_longest(
    ordered: Sequence[dict[str, Any]], key: str
) -> tuple[float, float, float]:
    """``(fixed, per_token, worst residual over all probes)`` of ``key`` vs tokens, the
    line through the two longest probes."""
    xs = [float(p["tokens"]) for p in ordered]
    ys = [float(p[key]) for p in ordered]
    fixed, per_token, _ = fit_linear(xs[-2:], ys[-2:])
    worst = max(abs(fixed + per_token * x - y) / y for x, y in zip(xs, ys, strict=True) if y)
    return fixed, per_token, worst


def computed_max_seq(probes: Sequence[dict[str, Any]], budget: int, batch: int) -> dict[str, Any]:
    """Max sequence length from memory probes at several lengths (the CPU path).

    Memory grows by a fixed number of bytes per token once activations dominate, but at
    short lengths a length-independent term can set the peak instead (full fine-tuning's
    weight gradients late in backward). So each phase's peak is fitted separately, with
    the slope from the two longest probes (nearest the lengths extrapolated to): the
    forward peak (every saved activation alive at its end; linear in tokens) and the
    forward+backward peak; the answer is the longest length both fit at. The optimizer-
    step peak does not depend on the length and only has to fit as is. The worst relative
    residual of each line over all probes is reported as a linearity check.
    """
    ordered = sorted(probes, key=lambda p: p["tokens"])
    if len(ordered) < 2 or ordered[-2]["tokens"] == ordered[-1]["tokens"]:
        raise ValueError("fitting bytes per token needs memory probes at two or more lengths")
    phases = {"fwd_bwd": "peak_fwd_bwd_bytes"}
    if all("peak_forward_bytes" in p for p in ordered):  # results older than this field
        phases["forward"] = "peak_forward_bytes"
    fits = {name: _line_through_longest(ordered, key) for name, key in phases.items()}
    growing = {name: fit for name, fit in fits.items() if fit[1] > 0}
    if not growing:
        raise ValueError("memory did not grow with sequence length between the longest probes")
    fits = {  # a flat phase sets no length limit (unless it is over budget already)
        name: fit for name, fit in fits.items() if fit[1] > 0 or fit[0] > budget
    }
    per_phase = {
        name: max_seq_from_fit(fixed, per_token, budget, batch) if per_token > 0 else 0
        for name, (fixed, per_token, _) in fits.items()
    }
    limiting = min(per_phase, key=per_phase.__getitem__)
    fixed, per_token, worst = fits[limiting]
    optimizer_peak = max(int(p["peak_optimizer_bytes"]) for p in ordered)
    return {
        "how": "computed",
        "budget_bytes": budget,
        "limiting_phase": limiting,
        "fixed_bytes": fixed,
        "bytes_per_token": per_token,
        "fit_worst_relative_residual": worst,
        "per_phase": {
            name: {
                "fixed_bytes": f,
                "bytes_per_token": b,
                "worst_residual": w,
                "max_seq": per_phase[name],
            }
            for name, (f, b, w) in fits.items()
        },  # fmt: skip
        "optimizer_peak_bytes": optimizer_peak,
        "max_seq": per_phase[limiting] if optimizer_peak <= budget else 0,
        "probe_tokens": [float(p["tokens"]) for p in ordered],
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
