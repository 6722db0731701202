"""Fake ``habana_frameworks.torch.dynamo.compile_backend.backends`` (``hpu_backend``).

The real module defines ``@register_backend def hpu_backend(graph_module, example_inputs,
**kwargs)`` (AOTAutograd + the Habana graph compiler). torch.compile on Gaudi needs eager
mode, ``PT_HPU_LAZY_MODE=0`` (gaudi-facts.md section 2), so the fake refuses to compile in
lazy mode. Otherwise it records ``("compile", n_ops)`` for each Dynamo graph and delegates
to torch's ``"aot_eager"`` backend (fast on CPU, same AOTAutograd path).

Registration: a single trampoline is registered once per process under the name
``"hpu_backend"``; it dispatches to the ``hpu_backend`` function of whichever copy of this
module is currently imported, so re-loading the fake never trips Dynamo's
"duplicate name" check. ``loader.unload_fake_sdk()`` removes the registration.
"""

import sys

from torch._dynamo.backends.registry import lookup_backend, register_backend

from habana_frameworks import _fake_events
from habana_frameworks.torch.utils.internal import is_lazy

BACKEND_NAME = "hpu_backend"

#: One dict per compiled Dynamo graph: {"n_ops": int, "targets": [str, ...], "n_inputs": int}
compile_log = []

LAZY_MODE_MESSAGE = (
    "hpu_backend (torch.compile) requires eager mode: set PT_HPU_LAZY_MODE=0 before importing "
    "habana_frameworks.torch. It was imported in lazy mode. [fake Gaudi SDK]"
)


def _call_nodes(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def hpu_backend(graph_module, example_inputs, **kwargs):
    """Compile a Dynamo graph for HPU (fake: record, then ``aot_eager``)."""
    import os

    if os.environ.get("PT_HPU_DISALLOW_TORCH_COMPILE", "0") == "1":
        raise RuntimeError("Use of torch.compile is prohibited by PT_HPU_DISALLOW_TORCH_COMPILE.")
    if is_lazy():
        raise RuntimeError(LAZY_MODE_MESSAGE)
    nodes = _call_nodes(graph_module)
    compile_log.append(
        {
            "n_ops": len(nodes),
            "targets": [str(n.target) for n in nodes],
            "n_inputs": len(example_inputs),
            "options": kwargs.get("options"),
        }
    )
    _fake_events.record("compile", len(nodes))
    return lookup_backend("aot_eager")(graph_module, example_inputs)


def _trampoline(graph_module, example_inputs, **kwargs):
    mod = sys.modules.get(__name__)
    if mod is None:
        raise RuntimeError("hpu_backend: the fake Gaudi SDK is not loaded any more")
    return mod.hpu_backend(graph_module, example_inputs, **kwargs)


_trampoline.__name__ = BACKEND_NAME
_trampoline._fake_hpu_trampoline = True


def _ensure_registered():
    from torch._dynamo.backends import registry

    existing = registry._COMPILER_FNS.get(BACKEND_NAME)
    if existing is not None:
        if getattr(existing, "_fake_hpu_trampoline", False):
            return
        raise RuntimeError(f"torch.compile backend {BACKEND_NAME!r} is already registered")
    register_backend(compiler_fn=_trampoline, name=BACKEND_NAME)


def _unregister():
    """Remove ``hpu_backend`` from Dynamo's registry (used by the loader's unload)."""
    from torch._dynamo.backends import registry

    fn = registry._COMPILER_FNS.get(BACKEND_NAME)
    if fn is not None and getattr(fn, "_fake_hpu_trampoline", False):
        registry._COMPILER_FNS.pop(BACKEND_NAME, None)
        registry._BACKENDS.pop(BACKEND_NAME, None)


_ensure_registered()
