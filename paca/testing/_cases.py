"""The shapes the suite checks every member on, and the vendor's extra shapes.

Fixed shapes cover the edges defects hide behind: ``r = 1``, ``r > 8``, ``r = in``,
more than 4096 and more than 65536 rows (kept narrow so they stay cheap), 2-D, 3-D and
4-D inputs, inputs without bias, non-square and strided convolutions. When hypothesis is
installed it adds a few more, generated derandomized (the same shapes on every run);
otherwise a seeded generator does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Pair = tuple[int, int]


@dataclass(frozen=True)
class LinearShape:
    """A PaCA linear case: ``x`` is ``(*lead, n_in)``, ``weight`` ``(n_out, n_in)``, ``r`` columns."""

    lead: tuple[int, ...]
    n_in: int
    n_out: int
    r: int
    bias: bool = True

    def __post_init__(self) -> None:
        if not self.lead or any(d < 1 for d in self.lead):
            raise ValueError(f"LinearShape.lead must be non-empty positive sizes, not {self.lead}")
        if not (1 <= self.r <= self.n_in) or self.n_out < 1:
            raise ValueError(f"LinearShape needs 1 <= r <= n_in and n_out >= 1: {self}")

    @property
    def rows(self) -> int:
        return math.prod(self.lead)

    def __str__(self) -> str:
        x = (*self.lead, self.n_in)
        bias = "" if self.bias else ", no bias"
        return f"x {x} ({self.rows} rows), weight ({self.n_out}, {self.n_in}), r={self.r}{bias}"


@dataclass(frozen=True)
class ConvShape:
    """A PaCA conv2d case: ``x`` is ``(batch, c_in, *hw)``, kernel ``(c_out, c_in, *kernel)``."""

    batch: int
    c_in: int
    c_out: int
    hw: Pair
    kernel: Pair
    r: int
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    bias: bool = True

    def __post_init__(self) -> None:
        if not (1 <= self.r <= self.c_in):
            raise ValueError(f"ConvShape needs 1 <= r <= c_in: {self}")
        if any(o < 1 for o in self.out_hw):
            raise ValueError(f"ConvShape gives an empty output {self.out_hw}: {self}")

    @property
    def out_hw(self) -> Pair:
        return tuple(  # type: ignore[return-value]
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                self.hw, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )

    @property
    def rows(self) -> int:
        """Positions the kernel gradient sums over: ``batch * H_out * W_out``."""
        return self.batch * self.out_hw[0] * self.out_hw[1]

    def __str__(self) -> str:
        geo = f"stride {self.stride}, padding {self.padding}, dilation {self.dilation}"
        bias = "" if self.bias else ", no bias"
        return (
            f"x ({self.batch}, {self.c_in}, {self.hw[0]}, {self.hw[1]}), kernel ({self.c_out}, "
            f"{self.c_in}, {self.kernel[0]}, {self.kernel[1]}), r={self.r}, {geo}{bias} "
            f"({self.rows} output positions)"
        )


Shape = LinearShape | ConvShape

#: Fixed linear shapes; each is there for a reason.
LINEAR_SHAPES: tuple[LinearShape, ...] = (
    LinearShape((3, 5), 40, 24, 6),  # 3-D input, unsorted columns
    LinearShape((7,), 16, 8, 1, bias=False),  # 2-D input, r = 1, no bias
    LinearShape((2, 3, 4), 20, 12, 12),  # 4-D input, r > 8
    LinearShape((33,), 12, 16, 12),  # r = in (every column trained)
    LinearShape((4100,), 16, 8, 9),  # more than 4096 rows, r > 8
    LinearShape((2, 33_001), 10, 6, 3),  # more than 65536 rows (narrow: stays cheap)
)

#: Fixed conv shapes.
CONV_SHAPES: tuple[ConvShape, ...] = (
    ConvShape(2, 10, 6, (9, 9), (3, 3), 3, padding=(1, 1)),
    ConvShape(1, 12, 5, (11, 11), (3, 3), 9, stride=(2, 2), dilation=(2, 2)),  # r > 8
    ConvShape(3, 5, 4, (6, 6), (1, 1), 5, bias=False),  # r = in, 1x1 kernel
    ConvShape(2, 6, 3, (8, 7), (3, 1), 1, stride=(2, 1), padding=(1, 0)),  # r = 1, non-square
    ConvShape(4, 4, 3, (33, 33), (3, 3), 2, padding=(1, 1)),  # more than 4096 positions
    ConvShape(2, 3, 2, (185, 185), (1, 1), 2),  # more than 65536 positions
)


def as_shape(spec: Any) -> Shape:
    """A vendor's extra shape: a :class:`LinearShape`/:class:`ConvShape` or a dict of their
    fields (a dict with ``kernel`` is a conv shape)."""
    if isinstance(spec, LinearShape | ConvShape):
        return spec
    if isinstance(spec, dict):
        fields = dict(spec)
        if "kernel" in fields:
            for k in ("hw", "kernel", "stride", "padding", "dilation"):
                if k in fields and isinstance(fields[k], int):
                    fields[k] = (fields[k], fields[k])
                elif k in fields:
                    fields[k] = tuple(fields[k])
            return ConvShape(**fields)
        if isinstance(fields.get("lead"), int):
            fields["lead"] = (fields["lead"],)
        elif "lead" in fields:
            fields["lead"] = tuple(fields["lead"])
        return LinearShape(**fields)
    raise TypeError(
        f"extra_shapes takes paca.testing.LinearShape / ConvShape instances or dicts of their "
        f"fields, not {type(spec).__name__} {spec!r}"
    )


# ------------------------------------------------------------------ generated shapes
def generated_shapes(count: int) -> tuple[list[LinearShape], list[ConvShape]]:
    """``count`` linear and ``count // 2`` conv shapes, the same on every run."""
    if count <= 0:
        return [], []
    try:
        return _hypothesis_shapes(count)
    except ImportError:
        return _seeded_shapes(count)


def _hypothesis_shapes(count: int) -> tuple[list[LinearShape], list[ConvShape]]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    @st.composite
    def linear(draw: Any) -> LinearShape:
        lead = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        n_in = draw(st.integers(1, 48))
        return LinearShape(
            lead, n_in, draw(st.integers(1, 32)), draw(st.integers(1, n_in)), draw(st.booleans())
        )

    @st.composite
    def conv(draw: Any) -> ConvShape:
        c_in = draw(st.integers(1, 12))
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
        need = [d * (kk - 1) + 1 - 2 * p for d, kk, p in zip(dilation, k, padding, strict=True)]
        hw = (draw(st.integers(max(need[0], 1), 9)), draw(st.integers(max(need[1], 1), 9)))
        return ConvShape(
            draw(st.integers(1, 3)), c_in, draw(st.integers(1, 8)), hw, k,
            draw(st.integers(1, c_in)), stride, padding, dilation, draw(st.booleans()),
        )  # fmt: skip

    out: dict[str, list[Any]] = {"linear": [], "conv": []}
    quiet = settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    @quiet
    @given(linear())
    def collect_linear(s: LinearShape) -> None:
        if s not in out["linear"]:
            out["linear"].append(s)

    @quiet
    @given(conv())
    def collect_conv(s: ConvShape) -> None:
        if s not in out["conv"]:
            out["conv"].append(s)

    collect_linear()
    collect_conv()
    return out["linear"][:count], out["conv"][: max(count // 2, 1)]


def _seeded_shapes(count: int) -> tuple[list[LinearShape], list[ConvShape]]:
    import random

    rng = random.Random(1234)
    linear = []
    for _ in range(count):
        n_in = rng.randint(1, 48)
        lead = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        linear.append(
            LinearShape(lead, n_in, rng.randint(1, 32), rng.randint(1, n_in), rng.random() < 0.5)
        )
    conv = []
    for _ in range(max(count // 2, 1)):
        c_in = rng.randint(1, 12)
        conv.append(
            ConvShape(rng.randint(1, 3), c_in, rng.randint(1, 8), (rng.randint(3, 9),) * 2,
                      (3, 3), rng.randint(1, c_in), padding=(1, 1))
        )  # fmt: skip
    return linear, conv
