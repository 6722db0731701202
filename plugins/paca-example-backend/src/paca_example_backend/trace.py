"""The record of backend calls a :class:`~paca_example_backend.TraceBackend` keeps."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from typing import Any, NamedTuple


class TraceEvent(NamedTuple):
    """One call paca made to the backend (a fused op, or a primitive such as write_columns)."""

    step: int  # optimizer steps completed before the call
    call: str  # the Backend member called, e.g. "linear_forward"
    shapes: tuple[tuple[int, ...], ...]  # of the tensor arguments, in order
    dtypes: tuple[str, ...]
    seconds: float


class Trace:
    """Bounded event log plus unbounded per-call totals (so long runs stay cheap)."""

    def __init__(self, max_events: int = 100_000) -> None:
        self.events: deque[TraceEvent] = deque(maxlen=max_events)
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.step = 0
        self.backward_passes = 0

    def record(self, event: TraceEvent) -> None:
        self.events.append(event)
        self.calls[event.call] += 1
        self.seconds[event.call] += event.seconds

    def clear(self) -> None:
        """Forget all events, totals and step counts (e.g. after warm-up)."""
        self.events.clear()
        self.calls.clear()
        self.seconds.clear()
        self.step = 0
        self.backward_passes = 0

    @property
    def dropped(self) -> int:
        """Events no longer in :attr:`events` because the log is bounded."""
        return sum(self.calls.values()) - len(self.events)

    def counts(self, step: int | None = None) -> dict[str, int]:
        """Calls per member, overall or (from the kept events) during optimizer step ``step``."""
        if step is None:
            return dict(self.calls)
        return dict(Counter(e.call for e in self.events if e.step == step))

    def to_records(self) -> list[dict[str, Any]]:
        """The kept events as JSON-ready dicts."""
        return [e._asdict() | {"shapes": [list(s) for s in e.shapes]} for e in self.events]

    def summary(self) -> str:
        """A table of calls and time per member, then step counts."""
        rows = [("CALL", "CALLS", "TOTAL MS", "MEAN US")]
        for name in sorted(self.calls):
            n, s = self.calls[name], self.seconds[name]
            rows.append((name, str(n), f"{s * 1e3:.3f}", f"{s / n * 1e6:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        lines.append(
            f"optimizer steps: {self.step}, backward passes: {self.backward_passes}, "
            f"events kept: {len(self.events)} (dropped {self.dropped})"
        )
        return "\n".join(lines)
