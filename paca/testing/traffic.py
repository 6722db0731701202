"""Count the bytes torch ops write: the deterministic measure of a PaCA step's extra work.

Step time is noisy on shared machines; bytes written are not. :class:`WriteCounter` is a
``TorchDispatchMode`` that adds up, for every aten op dispatched inside it, the bytes
of each new output tensor and of each argument the op writes in place (``out=``,
``index_copy_``, ``addmm_``...). Views write nothing and are not counted. The PaCA
layer's figure minus the same layer frozen is the extra traffic the backend adds; the
seam's bound is that this stays a small fraction of the weight's bytes.

Used by the conformance suite, the tests and ``paca bench``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Argument names of the values an indexed in-place op writes into its destination.
_SOURCES = ("source", "values", "src")


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return id(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class WriteCounter(TorchDispatchMode):
    """Bytes written by aten ops run inside the context (``counter.bytes``, ``by_op``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.by_op: Counter[str] = Counter()
        self._paused = 0

    def add(self, nbytes: int, op: str) -> None:
        """Count ``nbytes`` written by ``op`` that the dispatcher does not see (a kernel)."""
        self.bytes += nbytes
        self.by_op[op] += nbytes

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside (e.g. the Triton interpreter's host copies of a kernel's
        arguments, which a real GPU launch does not make); :meth:`add` what the kernel
        logically writes instead."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        written = 0
        schema = func._schema
        named = {
            arg.name: (kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i])
            for i, arg in enumerate(schema.arguments)
        }
        source = next((named[n] for n in _SOURCES if isinstance(named.get(n), torch.Tensor)), None)
        for arg in schema.arguments:
            info = arg.alias_info
            if info is None or not info.is_write:
                continue
            for t in tree_flatten(named[arg.name])[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                # Indexed writes (index_copy_, index_put_, scatter_...) write only the
                # source's elements into the destination, not the whole destination.
                written += source.numel() * t.element_size() if source is not None else _nbytes(t)
        returns = out if isinstance(out, tuple | list) else (out,)
        inputs = {
            _storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for ret, t in zip(schema.returns, returns, strict=False):
            # ``_unsafe_view`` and friends declare no alias but return the input's storage
            if ret.alias_info is None and isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                written += _nbytes(t)
        if written:
            self.bytes += written
            self.by_op[str(func.overloadpacket.__name__)] += written
        return out


def bytes_written(fn: Callable[[], Any]) -> int:
    """Bytes the aten ops of ``fn()`` write (see :class:`WriteCounter`)."""
    with WriteCounter() as counter:
        fn()
    return counter.bytes
