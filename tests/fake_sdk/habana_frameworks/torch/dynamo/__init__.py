"""Deferred registration of the fake ``hpu_backend`` torch.compile backend.

Importing ``torch._dynamo`` costs seconds, so, like the real bridge (which postpones its
compile-backend imports), the fake does not import it eagerly. If Dynamo's backend
registry is already imported, ``hpu_backend`` is registered immediately; otherwise a
one-shot ``sys.meta_path`` hook registers it right after ``torch._dynamo.backends.registry``
is first imported (which ``torch.compile`` / ``import torch._dynamo`` always do).
"""

import importlib
import importlib.abc
import sys

_REGISTRY = "torch._dynamo.backends.registry"
_BACKENDS = "habana_frameworks.torch.dynamo.compile_backend.backends"


def _register_now():
    importlib.import_module(_BACKENDS)


def _remove_hooks():
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_fake_hpu_hook", False)]


class _RegistryImportHook(importlib.abc.MetaPathFinder):
    _fake_hpu_hook = True

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        spec = None
        for finder in sys.meta_path:
            if getattr(finder, "_fake_hpu_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module):
            orig_exec(module)
            _remove_hooks()
            _register_now()

        spec.loader.exec_module = exec_module
        return spec


def install():
    """Register ``hpu_backend`` now if Dynamo is loaded, else when it gets loaded."""
    _remove_hooks()
    if _REGISTRY in sys.modules:
        _register_now()
    else:
        sys.meta_path.insert(0, _RegistryImportHook())
