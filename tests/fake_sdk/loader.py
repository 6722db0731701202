"""Load / unload the fake Intel Gaudi SDK (``habana_frameworks``) for tests.

The fake, like the real bridge, reads its environment once when
``habana_frameworks.torch`` is imported, so switching mode or release means re-importing.
These helpers do that cleanly inside the current process::

    import sys; sys.path.insert(0, "tests/fake_sdk")   # or: from fake_sdk.loader import ...
    from loader import load_fake_sdk, unload_fake_sdk, fake_sdk, fake_events

    htorch = load_fake_sdk(lazy=False)            # eager / torch.compile mode, SW 1.21.0
    import habana_frameworks.torch.core as htcore  # now the freshly loaded fake
    ...
    unload_fake_sdk()                             # restore env, torch.hpu, sys.modules

    with fake_sdk(lazy=True, version="1.18.0") as htorch:
        ev = fake_events()                         # habana_frameworks._fake_events
        ...

Public API
----------
``load_fake_sdk(lazy: bool | None = None, version: str = "1.21.0", device_count: int = 1,
*, device_name: str = "GAUDI2", extra_env: Mapping[str, str | None] | None = None)
-> types.ModuleType``
    Sets the environment, purges every ``habana_frameworks*`` (and ``torch.hpu``) entry
    from ``sys.modules``, puts this directory on ``sys.path`` and imports
    ``habana_frameworks.torch``, which it returns. ``lazy``: True -> ``PT_HPU_LAZY_MODE=1``,
    False -> ``"0"``, None -> unset (the release default: lazy before 1.21, eager from
    1.21). ``version`` -> ``FAKE_SDK_VERSION``; ``device_count`` ->
    ``FAKE_HPU_DEVICE_COUNT`` (0 = no HPU visible); ``device_name`` ->
    ``FAKE_HPU_DEVICE_NAME``; ``extra_env`` sets (or, with value None, unsets) further
    variables, e.g. ``{"FAKE_HPU_EAGER_MARK_STEP": "noop"}`` or ``{"FAKE_HCCL_AS_GLOO":
    "1"}``. Each call starts with a fresh, empty event log. The environment stays set
    while the fake is loaded (code under test may read ``PT_HPU_LAZY_MODE`` itself).
``unload_fake_sdk() -> None``
    Purges the fake from ``sys.modules``, removes ``torch.hpu`` and the ``"hpu_backend"``
    torch.compile backend it registered, restores every environment variable that
    ``load_fake_sdk`` (or the fake's import) changed, and removes this directory from
    ``sys.path`` if ``load_fake_sdk`` added it. Safe to call when nothing is loaded.
``fake_sdk(**same_kwargs_as_load_fake_sdk)``
    Context manager: ``load_fake_sdk`` on entry (yields the module), ``unload_fake_sdk``
    on exit.
``fake_events() -> types.ModuleType``
    The currently loaded ``habana_frameworks._fake_events`` (``events()``, ``count(kind)``,
    ``clear_events()``, ``kinds()``).
``FAKE_SDK_DIR``: this directory (what goes on ``sys.path``).

Caveat: with this directory on ``sys.path``, ``transformers``/``accelerate`` detect a
Gaudi SDK. ``transformers.utils.import_utils.is_torch_hpu_available()`` (cached per
process) then monkey-patches ``torch.compile`` (forcing ``backend="hpu_backend"``),
``torch.gather`` and friends, exactly as on a real Gaudi machine. Run such tests in a
subprocess, or make sure that function was already evaluated before loading the fake.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

FAKE_SDK_DIR = str(Path(__file__).resolve().parent)

#: Variables the loader or the fake's import may change; restored by unload_fake_sdk().
_MANAGED_ENV = (
    "PT_HPU_LAZY_MODE",
    "FAKE_SDK_VERSION",
    "FAKE_HPU_DEVICE_COUNT",
    "FAKE_HPU_DEVICE_NAME",
    "TORCHINDUCTOR_COMPILE_THREADS",
)

_saved_env: dict[str, str | None] | None = None
_added_sys_path = False


def _purge_modules() -> None:
    for name in list(sys.modules):
        if name == "habana_frameworks" or name.startswith("habana_frameworks."):
            del sys.modules[name]


def _detach_torch_hpu() -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    hpu = getattr(torch, "hpu", None)
    if hpu is not None and getattr(hpu, "_IS_FAKE_HPU_MODULE", False):
        delattr(torch, "hpu")
        if sys.modules.get("torch.hpu") is hpu:
            del sys.modules["torch.hpu"]


def _unregister_compile_backend() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_fake_hpu_hook", False)]
    if "torch._dynamo.backends.registry" not in sys.modules:
        return
    from torch._dynamo.backends import registry

    fn = registry._COMPILER_FNS.get("hpu_backend")
    if fn is not None and getattr(fn, "_fake_hpu_trampoline", False):
        registry._COMPILER_FNS.pop("hpu_backend", None)
        registry._BACKENDS.pop("hpu_backend", None)


def _save_env(keys) -> None:
    global _saved_env
    if _saved_env is None:
        _saved_env = {}
    for k in keys:
        if k not in _saved_env:
            _saved_env[k] = os.environ.get(k)


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def load_fake_sdk(
    lazy: bool | None = None,
    version: str = "1.21.0",
    device_count: int = 1,
    *,
    device_name: str = "GAUDI2",
    extra_env: Mapping[str, str | None] | None = None,
) -> types.ModuleType:
    """(Re)import the fake SDK under the given configuration; return ``habana_frameworks.torch``.

    See the module docstring for the meaning of every argument.
    """
    global _added_sys_path
    extra_env = dict(extra_env or {})
    _save_env(_MANAGED_ENV + tuple(extra_env))

    _purge_modules()
    _detach_torch_hpu()
    _unregister_compile_backend()

    if lazy is None:
        _set_env("PT_HPU_LAZY_MODE", None)
    else:
        _set_env("PT_HPU_LAZY_MODE", "1" if lazy else "0")
    _set_env("FAKE_SDK_VERSION", str(version))
    _set_env("FAKE_HPU_DEVICE_COUNT", str(int(device_count)))
    _set_env("FAKE_HPU_DEVICE_NAME", device_name)
    for k, v in extra_env.items():
        _set_env(k, v)

    if FAKE_SDK_DIR not in sys.path:
        sys.path.insert(0, FAKE_SDK_DIR)
        _added_sys_path = True
    importlib.invalidate_caches()
    return importlib.import_module("habana_frameworks.torch")


def unload_fake_sdk() -> None:
    """Undo :func:`load_fake_sdk` (modules, torch.hpu, hpu_backend, env, sys.path)."""
    global _saved_env, _added_sys_path
    _purge_modules()
    _detach_torch_hpu()
    _unregister_compile_backend()
    if _saved_env is not None:
        for k, v in _saved_env.items():
            _set_env(k, v)
        _saved_env = None
    if _added_sys_path:
        with contextlib.suppress(ValueError):
            sys.path.remove(FAKE_SDK_DIR)
        _added_sys_path = False


@contextlib.contextmanager
def fake_sdk(
    lazy: bool | None = None,
    version: str = "1.21.0",
    device_count: int = 1,
    *,
    device_name: str = "GAUDI2",
    extra_env: Mapping[str, str | None] | None = None,
) -> Iterator[types.ModuleType]:
    """Context manager around :func:`load_fake_sdk` / :func:`unload_fake_sdk`."""
    module = load_fake_sdk(
        lazy, version, device_count, device_name=device_name, extra_env=extra_env
    )
    try:
        yield module
    finally:
        unload_fake_sdk()


def fake_events() -> types.ModuleType:
    """The event log module of the currently loaded fake."""
    if "habana_frameworks.torch" not in sys.modules:
        raise RuntimeError("the fake Gaudi SDK is not loaded; call load_fake_sdk() first")
    return importlib.import_module("habana_frameworks._fake_events")
