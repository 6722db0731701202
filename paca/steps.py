"""Step-boundary hooks, so lazy-mode devices can mark steps without user code.

A backend with ``wants_step_hooks = True`` (and ``step_hooks_enabled``) gets :meth:`Backend.on_backward_end`
once at the end of every backward pass that went through a PaCA layer (queued on
the autograd engine from inside the PaCA backward), and
:meth:`Backend.on_optimizer_step` after every ``optimizer.step()`` of an
optimizer that holds PaCA parameters (a global optimizer post-step hook). A
plain ``loss.backward(); opt.step(); opt.zero_grad()`` loop therefore marks the
same boundaries optimum-habana's trainer does. Backends that need nothing never
install anything.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend

#: Attribute set on every PaCA ``delta`` parameter: the backend that computes it.
BACKEND_ATTR = "_paca_backend"

_state = threading.local()
_optimizer_hook: Any = None
_optimizer_backends: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, list]] = (
    weakref.WeakKeyDictionary()
)


def queue_backward_end(backend: Backend) -> None:
    """Arrange one ``backend.on_backward_end()`` call when the current backward finishes."""
    if not backend.wants_step_hooks or torch.compiler.is_compiling():
        return
    if not backend.step_hooks_enabled:
        return
    pending: set[int] = getattr(_state, "pending", None) or set()
    if id(backend) in pending:
        return
    pending.add(id(backend))
    _state.pending = pending

    def _callback() -> None:
        pending.discard(id(backend))
        if backend.step_hooks_enabled:
            backend.on_backward_end()

    torch.autograd.Variable._execution_engine.queue_callback(_callback)


def _backends_of(optimizer: torch.optim.Optimizer) -> list[Backend]:
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    cached = _optimizer_backends.get(optimizer)
    if cached is not None and cached[0] == n_params:
        return cached[1]
    found: dict[int, Backend] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            b = getattr(p, BACKEND_ATTR, None)
            if b is not None and b.wants_step_hooks:
                found[id(b)] = b
    backends = list(found.values())
    _optimizer_backends[optimizer] = (n_params, backends)
    return backends


def _after_optimizer_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for backend in _backends_of(optimizer):
        if backend.step_hooks_enabled:
            backend.on_optimizer_step()


def install_optimizer_hook() -> None:
    """Install the global optimizer post-step hook once per process."""
    global _optimizer_hook
    if _optimizer_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _optimizer_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def tag_parameter(param: torch.nn.Parameter, backend: Backend) -> None:
    setattr(param, BACKEND_ATTR, backend)
    if backend.wants_step_hooks:
        install_optimizer_hook()
