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

import contextlib
import hashlib
import inspect
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

from paca.config import as_int
from paca.layers_base import PacaLayer

#: A strategy gets (module name, the PaCA layer, r, seed, n=in_features, **options) and
#: returns r column indices. Strategies in NEEDS_CALIBRATION also get ``scores``.
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
    """Check user- or strategy-given indices: ints (floats are refused, never truncated),
    distinct, within ``[0, n)``; returned sorted as a CPU int64 tensor."""
    if isinstance(idx, torch.Tensor):
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(
                f"PaCA indices for {key!r} must be integers, got a {idx.dtype} tensor "
                f"(floats are not truncated); return or pass column numbers as ints"
            )
        t = idx.detach().flatten().to(device="cpu", dtype=torch.long)
    else:
        if isinstance(idx, (str, bytes)) or not hasattr(idx, "__iter__"):
            raise TypeError(
                f"PaCA indices for {key!r} must be a list of column numbers, got "
                f"{type(idx).__name__} {idx!r:.60}"
            )
        values = [
            as_int(v, f"PaCA indices for {key!r}: item {i}", "floats are not truncated")
            for i, v in enumerate(idx)
        ]
        t = torch.tensor(values, dtype=torch.long)
    check_rank(int(t.numel()), n, key)
    if int(t.min()) < 0 or int(t.max()) >= n:
        bad = [i for i in t.tolist() if not 0 <= i < n]
        raise ValueError(
            f"PaCA indices for {key!r} must lie in [0, {n}) (the module has {n} input "
            f"columns/channels); {bad[:10]} do not, got {t.tolist()[:20]}"
        )
    if t.unique().numel() != t.numel():
        raise ValueError(f"PaCA indices for {key!r} must be distinct; got {t.tolist()[:20]}")
    return t.sort().values


@register_strategy("random")
def _random(name: str, module: Any, r: int, seed: int, n: int, **_: Any) -> torch.Tensor:
    return random_columns(n, r, seed, name)


def _column_weight(module: Any) -> torch.Tensor:
    """The module's weight as ``(out, in, ...)``: PaCA layers know their layout."""
    weight_oi = getattr(module, "weight_oi", None)
    return weight_oi() if callable(weight_oi) else module.weight


def column_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of every input column of an ``(out, in, ...)`` tensor, in fp32."""
    return t.detach().float().transpose(0, 1).reshape(t.shape[1], -1).norm(dim=1)


def top_columns(scores: torch.Tensor, r: int, largest: bool, key: str) -> torch.Tensor:
    """The ``r`` columns with the largest (or smallest) score; ties go to the lower index."""
    if not isinstance(largest, bool):
        raise TypeError(f"selection option 'largest' must be True or False, got {largest!r}")
    check_rank(r, int(scores.numel()), key)
    scores = scores.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError(
            f"column scores of {key!r} contain NaN/Inf (a diverged calibration loss or a "
            f"corrupt weight?); fix the input or use selection='random'"
        )
    order = torch.sort(scores, descending=largest, stable=True).indices
    return order[:r]


@register_strategy("weight_norm")
def _weight_norm(
    name: str, module: Any, r: int, seed: int, n: int, *, largest: bool = True
) -> torch.Tensor:
    """Columns whose pretrained weights have the largest (``largest=False``: smallest) L2
    norm, over all output rows and kernel positions."""
    return top_columns(column_norms(_column_weight(module)), r, largest, name)


@register_strategy("gradient")
def _gradient(
    name: str,
    module: Any,
    r: int,
    seed: int,
    n: int,
    *,
    largest: bool = True,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Columns with the largest (``largest=False``: smallest) gradient norm on calibration
    batches. ``scores`` (per-column norms) come from :func:`gradient_scores`."""
    if scores is None:
        raise ValueError(
            f"selection='gradient' for {name!r} needs calibration batches: pass "
            f"calibration=[batch, ...] to paca.wrap or PacaModel.add_adapter"
        )
    return top_columns(scores, r, largest, name)


#: Strategies that need calibration batches (their scores are computed model-wide).
NEEDS_CALIBRATION = {"gradient"}


def strategy_needs_calibration(strategy: str) -> bool:
    return strategy in NEEDS_CALIBRATION


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _calibration_loss(
    model: torch.nn.Module,
    out: Any,
    batch: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(out, batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            f"calibration output of {type(model).__name__} has no .loss; pass "
            f"loss_fn=lambda output, batch: ... to compute one"
        )
    return loss


def gradient_scores(
    model: torch.nn.Module,
    layers: dict[str, Any],
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-column L2 norms of each layer's dense weight gradient, summed over ``batches``.

    Every PaCA layer is temporarily disabled, the target base weights made trainable and
    all other parameters frozen, so the gradients are those of the pretrained model and
    no other adapter's ``.grad`` is touched; the model runs in eval mode (no
    dropout: the same batches always give the same columns). Everything is restored
    afterwards, also on error. ``layers`` maps module names to PaCA layers.
    """
    # layers whose base weight has no gradient (4-bit bases) measure the dense gradient of
    # their dequantized weight with a probe instead (PacaLinear4bit.dense_grad_probe)
    probes = {k: layer.dense_grad_probe() for k, layer in layers.items() if _has_probe(layer)}
    weights = {k: layer.base_layer.weight for k, layer in layers.items() if k not in probes}
    probe_stack = contextlib.ExitStack()
    ids = {id(w) for w in weights.values()}
    saved = [(w, w.requires_grad, w.grad) for w in weights.values()]
    # every other trainable tensor (another adapter's deltas) is left out of the backward
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    paca_layers = [m for m in model.modules() if isinstance(m, PacaLayer)]
    disabled = [(layer, layer.disabled) for layer in paca_layers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        probed = {k: probe_stack.enter_context(p) for k, p in probes.items()}
        model.eval()
        for p in others:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for layer, _ in disabled:
            layer.disabled = True
        count = 0
        for batch in batches:
            with torch.enable_grad():  # even if the caller runs under no_grad
                out = _call(model, batch)
                loss = _calibration_loss(model, out, batch, loss_fn)
                loss.backward()
            count += 1
        if count == 0:
            raise ValueError("calibration batches are empty: give at least one batch")
        scores = {}
        for k, layer in layers.items():
            grad = probed[k]() if k in probed else weights[k].grad
            if grad is None:
                raise ValueError(
                    f"module {k!r} got no gradient from the calibration loss (is it used in "
                    f"the forward pass?); exclude it or choose another strategy"
                )
            scores[k] = column_norms(layer.oi_view(grad))
        return scores
    finally:
        probe_stack.close()
        for m, mode in modes:
            m.training = mode
        for p in others:
            p.requires_grad_(True)
        for w, req, grad in saved:
            w.requires_grad_(req)
            w.grad = grad
        for layer, was in disabled:
            layer.disabled = was


def _has_probe(layer: Any) -> bool:
    return callable(getattr(type(layer), "dense_grad_probe", None))


def select_columns(
    strategy: str, name: str, module: Any, r: int, seed: int, n: int, **options: Any
) -> torch.Tensor:
    """Run strategy ``strategy`` for one module and validate what it returns.

    ``module`` is the PaCA layer (``module.base_layer`` is the adapted module and
    ``module.weight_oi()`` its weight as ``(out, in, ...)``).
    """
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown PaCA selection strategy {strategy!r}; known: {', '.join(sorted(STRATEGIES))}"
        ) from None
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [k for k in params if k not in {"name", "module", "r", "seed", "n", "scores"}]
        bad = sorted(set(options) - set(params) - {"scores"})
        if bad:
            raise ValueError(
                f"unknown selection_options {bad} for strategy {strategy!r}; it accepts: "
                f"{known or 'no options'}"
            )
    return validate_indices(fn(name, module, r, seed, n=n, **options), n, name)
