"""Global, thread-safe event log of the fake Gaudi SDK.

Every emulated SDK entry point appends one tuple whose first element is its kind:

=========================  ===================================================
``("sdk_import", version, "lazy"|"eager")``  ``import habana_frameworks.torch``
``("mark_step",)``         ``htcore.mark_step`` in lazy mode (also the implicit
                           ones issued by ``hpex.optimizers.FusedAdamW.step``)
``("synchronize",)``       ``torch.hpu.synchronize()``
``("wrap_in_hpu_graph", cls)``   ``wrap_in_hpu_graph(module)``; ``cls`` = class name
``("module_cacher", cls)``       ``ModuleCacher(...)(model=module)``
``("graph_capture", key)``       first call for a new input signature (capture)
``("graph_replay", key)``        later call with a known input signature (replay)
``("graph_bypass", key)``        call not graphed (``max_graphs`` full, or
                                 ``bypass_hpu_graphs=True``)
``("hpu_graph_capture_begin", gid)`` / ``("hpu_graph_capture_end", gid)`` /
``("hpu_graph_replay", gid)``    raw ``HPUGraph`` objects
``("make_graphed_callables", n)``
``("compile", n_ops)``           one ``hpu_backend`` invocation = one Dynamo graph
                                 with ``n_ops`` call nodes
``("dynamic_shape", bool)``      ``enable/disable_dynamic_shape()``
``("fused_sdpa",)``, ``("fused_rmsnorm",)``, ``("fused_adamw_step",)``,
``("fused_clip_norm",)``         hpex kernels
=========================  ===================================================

``key`` for graph events is ``(module_class_name, input_signature)`` where the
signature is a nested tuple of tensor shapes/dtypes/strides and hashable values.

The log lives in this module, so re-loading the fake (``loader.load_fake_sdk``)
starts a fresh, empty log.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_EVENTS: list[tuple[Any, ...]] = []


def record(kind: str, *payload: Any) -> None:
    """Append ``(kind, *payload)`` to the log."""
    with _LOCK:
        _EVENTS.append((kind, *payload))


def events(kind: str | None = None) -> list[tuple[Any, ...]]:
    """A copy of the log, optionally only the events of one ``kind``."""
    with _LOCK:
        if kind is None:
            return list(_EVENTS)
        return [e for e in _EVENTS if e[0] == kind]


def clear_events() -> None:
    """Empty the log."""
    with _LOCK:
        _EVENTS.clear()


def count(kind: str) -> int:
    """Number of logged events of ``kind``."""
    with _LOCK:
        return sum(1 for e in _EVENTS if e[0] == kind)


def kinds() -> list[str]:
    """Kinds in log order (handy for asserting call sequences)."""
    with _LOCK:
        return [e[0] for e in _EVENTS]
