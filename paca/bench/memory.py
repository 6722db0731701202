"""Memory measurements: saved activations, allocated-bytes tracking, optimizer state.

Saved activations are counted with ``torch.autograd.graph.saved_tensors_hooks``:
every tensor autograd keeps for backward passes through the pack hook. Tensors that
share storage with a parameter or buffer are not activations (they exist anyway)
and are excluded; a storage saved several times (q, k and v saving the same input)
is counted once, because it occupies memory once.

On devices whose backend reports ``max_memory_allocated`` (CUDA, HPU) the peak comes
from the device allocator. On CPU torch keeps no such counter, so
:class:`AllocationTracker` (a ``TorchDispatchMode``) counts the storages ATen
operators create: every operator output whose storage is new (not a view of, or an
in-place result on, one of the operator's inputs) is live from the moment the
operator returns until its storage is freed. That covers activations, saved tensors,
gradients, optimizer temporaries and outputs; it does not see scratch memory a
kernel allocates and frees internally, nor allocator caching or fragmentation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(t: torch.Tensor) -> int | None:
    """Address of ``t``'s storage (None for tensors without one, e.g. sparse)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the whole storage behind ``t`` (what it keeps alive)."""
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        key = storage_key(t)
        if key is not None and key != 0:
            seen[key] = storage_nbytes(t)
    return sum(seen.values())


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` (what is not an activation)."""
    return [*model.parameters(), *model.buffers()]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (Adam moments, step counts)."""
    if optimizer is None:
        return 0
    return unique_storage_bytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


@dataclass
class LayerSaved:
    """Saved bytes attributed to one target layer, next to its input size."""

    saved_bytes: int = 0
    input_bytes: int = 0
    input_shape: list[int] = field(default_factory=list)
    in_features: int | None = None


def _in_features(module: nn.Module) -> int | None:
    for obj in (module, getattr(module, "base_layer", None)):
        value = getattr(obj, "in_features", None)
        if isinstance(value, int):
            return value
    return None


class SavedActivationCounter:
    """Counts bytes autograd saves for backward inside ``with counter.count():``.

    The one saved-activation counter of the project: ``paca bench``, the CUDA
    micro-benchmark and the tests use it (:func:`saved_activation_bytes` is the short
    form). ``exclude`` are tensors that exist anyway (parameters, buffers): anything
    sharing storage with them is not an activation. Bytes are whole storages, each
    counted once (a small view into a large tensor keeps all of it alive; q, k and v
    saving one input keep it once).

    ``layers`` maps names to modules whose forward saves are attributed to them (the
    innermost running one wins); everything else is attributed to ``"other"``. A
    storage is attributed to the first layer that saved it. With ``keep=True`` the
    counted tensors are also kept in ``saved`` (for error messages in tests; it keeps
    them alive, so never use it while measuring peak memory).
    """

    def __init__(
        self,
        exclude: Iterable[torch.Tensor] = (),
        layers: dict[str, nn.Module] | None = None,
        keep: bool = False,
    ) -> None:
        self._excluded = {k for k in map(storage_key, exclude) if k is not None}
        self._layers = layers or {}
        self._stack: list[str] = []
        self._seen: set[int] = set()
        self._keep = keep
        self.saved: list[torch.Tensor] = []
        self.total_bytes = 0
        self.other_bytes = 0
        self.per_layer: dict[str, LayerSaved] = {name: LayerSaved() for name in self._layers}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is None or key == 0 or key in self._excluded or key in self._seen:
            return t
        self._seen.add(key)
        if self._keep:
            self.saved.append(t)
        nbytes = storage_nbytes(t)
        self.total_bytes += nbytes
        if self._stack:
            self.per_layer[self._stack[-1]].saved_bytes += nbytes
        else:
            self.other_bytes += nbytes
        return t

    @contextmanager
    def count(self) -> Iterator[SavedActivationCounter]:
        handles = []
        for name, module in self._layers.items():
            handles.append(module.register_forward_pre_hook(self._enter(name)))
            handles.append(module.register_forward_hook(self._leave(name)))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._stack.append(name)
            x = args[0] if args and torch.is_tensor(args[0]) else None
            rec = self.per_layer[name]
            if x is not None and not rec.input_shape:
                rec.input_bytes = x.numel() * x.element_size()
                rec.input_shape = list(x.shape)
                rec.in_features = _in_features(module)

        return hook

    def _leave(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return hook


def saved_activation_bytes(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = (), keep: bool = False
) -> tuple[Any, SavedActivationCounter]:
    """Run ``fn()`` counting what autograd saves for backward; ``(result, counter)``.

    ``counter.total_bytes`` is the figure (see :class:`SavedActivationCounter`);
    ``exclude`` the parameters and buffers (e.g. :func:`model_tensors`).
    """
    counter = SavedActivationCounter(exclude, keep=keep)
    with counter.count():
        out = fn()
    return out, counter


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages ATen operators create (CPU peak memory).

    An operator output counts when its storage is not one of the operator's inputs'
    storages (so views and in-place results are not new memory) and is not already
    live; it stops counting when its storage is freed (a finalizer on the storage).
    Storages that existed before the mode was entered (parameters, optimizer state)
    are never counted: add them separately as static bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.allocations = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, 0)
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = storage_key(t)
            if key is None or key == 0 or key in inputs or key in self.live:
                continue
            storage = t.untyped_storage()
            nbytes = int(storage.nbytes())
            self.live[key] = nbytes
            self.current += nbytes
            self.allocations += 1
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out
