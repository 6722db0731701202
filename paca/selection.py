"""Which input columns of a layer PaCA trains.

The default is the paper's: r columns chosen uniformly at random, once, before
training. The choice must be reproducible on any machine and backend, so it is
drawn from a seed derived from ``(seed, module name)`` with Python's Mersenne
Twister ``random()`` (whose output sequence Python guarantees across versions)
and a partial Fisher-Yates shuffle, never from a device RNG. Indices are sorted:
a sorted gather reads memory in order, and the order carries no meaning.

Other strategies (weight norm, gradient magnitude, user-given) register
themselves in :data:`STRATEGIES` with :func:`register_strategy`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import torch

#: A strategy gets (module name, the wrapped module, r, seed, options) and returns indices.
Strategy = Callable[..., "torch.Tensor | list[int]"]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Decorator adding a column-selection strategy under ``name``."""

    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


def derive_seed(seed: int, key: str) -> int:
    """A 64-bit seed that depends on the global seed and the module name, stably."""
    digest = hashlib.sha256(f"paca:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def random_columns(n: int, r: int, seed: int, key: str) -> torch.Tensor:
    """``r`` distinct sorted indices in ``[0, n)``, a pure function of ``(n, r, seed, key)``."""
    check_rank(r, n, key)
    rng = random.Random(derive_seed(seed, key))
    swapped: dict[int, int] = {}
    chosen = []
    for i in range(r):  # partial Fisher-Yates: O(r) time and memory, whatever n is
        j = i + int(rng.random() * (n - i))
        chosen.append(swapped.get(j, j))
        swapped[j] = swapped.get(i, i)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def check_rank(r: int, n: int, key: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"PaCA rank r must be an int, got {type(r).__name__} for {key!r}")
    if not 1 <= r <= n:
        raise ValueError(
            f"PaCA rank r={r} does not fit module {key!r}, which has {n} input "
            f"columns/channels: choose 1 <= r <= {n}, or exclude this module from "
            f"target_modules."
        )


def validate_indices(idx: torch.Tensor | list[int], n: int, key: str) -> torch.Tensor:
    """Check user- or strategy-given indices: 1-D, distinct, within range."""
    t = torch.as_tensor(idx, dtype=torch.long).flatten().cpu()
    check_rank(int(t.numel()), n, key)
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise ValueError(f"PaCA indices for {key!r} must lie in [0, {n}); got {t.tolist()}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"PaCA indices for {key!r} must be distinct; got {t.tolist()}")
    return t.sort().values


@register_strategy("random")
def _random(name: str, module: Any, r: int, seed: int, n: int, **_: Any) -> torch.Tensor:
    return random_columns(n, r, seed, name)


def select_columns(
    strategy: str, name: str, module: Any, r: int, seed: int, n: int, **options: Any
) -> torch.Tensor:
    """Run strategy ``strategy`` for one module and validate what it returns."""
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown PaCA selection strategy {strategy!r}; known: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return validate_indices(fn(name, module, r, seed, n=n, **options), n, name)
