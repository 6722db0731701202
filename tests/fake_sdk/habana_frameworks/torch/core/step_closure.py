"""Fake ``habana_frameworks.torch.core.step_closure`` (mark_step + step closures).

Real: ``@lazy_only def mark_step(device_str="", sync=False)`` calls the plugin's
``_mark_step`` (cut and launch the accumulated lazy graph; ``sync=True`` also waits on the
host) and then runs the queued step closures. In eager mode the real decorator turns the
call into a logged no-op; this fake raises instead (``FAKE_HPU_EAGER_MARK_STEP=raise``,
the default) so that tests catch code that still calls mark_step when it should not.
"""

import logging
import threading

from habana_frameworks import _fake_config, _fake_events
from habana_frameworks.torch.utils.internal import is_lazy

logger = logging.getLogger(__name__)

_DEVICE_CONTEXTS = {}
_DEVICE_CONTEXTS_LOCK = threading.Lock()

EAGER_MARK_STEP_MESSAGE = (
    "habana_frameworks.torch.core.mark_step() was called in eager mode "
    "(PT_HPU_LAZY_MODE=0, or unset on SW >= 1.21). mark_step is lazy-mode only: it cuts the lazily accumulated graph "
    "and has no effect in eager/torch.compile mode (the real SDK silently ignores it). "
    "Guard the call with habana_frameworks.torch.utils.internal.is_lazy(). "
    "[fake Gaudi SDK; set FAKE_HPU_EAGER_MARK_STEP=noop for the real no-op behaviour]"
)


class _DeviceContext:
    def __init__(self, device):
        self.device = device


def _get_device_context(device=None):
    if device is None:
        device = "hpu:0"
    with _DEVICE_CONTEXTS_LOCK:
        devctx = _DEVICE_CONTEXTS.get(device)
        if devctx is None:
            devctx = _DeviceContext(device)
            _DEVICE_CONTEXTS[device] = devctx
        return devctx


def add_step_closure(closure, args=()):
    """Queue ``closure(*args)`` to run after the next ``mark_step()`` (lazy mode)."""
    devctx = _get_device_context()
    step_closures = getattr(devctx, "step_closures", None)
    if step_closures is None:
        step_closures = []
        devctx.step_closures = step_closures
    step_closures.append(lambda a=args: closure(*a))


def _run_step_closures():
    devctx = _get_device_context()
    step_closures = getattr(devctx, "step_closures", None)
    if step_closures is not None:
        devctx.step_closures = []
        for closure in step_closures:
            closure()


def _eager_misuse(name):
    if _fake_config.EAGER_MARK_STEP == "raise":
        raise RuntimeError(EAGER_MARK_STEP_MESSAGE.replace("mark_step()", f"{name}()", 1))
    logger.info(
        f"Call {name} function will not have any effect. It's lazy mode only functionality."
    )


def mark_step(device_str="", sync=False):
    """Cut the lazy graph (fake: record ``("mark_step",)``) and run step closures."""
    if not is_lazy():
        _eager_misuse("mark_step")
        return
    _fake_events.record("mark_step")
    _run_step_closures()


def iter_mark_step(device_str=""):
    if not is_lazy():
        _eager_misuse("iter_mark_step")
        return
    _fake_events.record("mark_step")
    _run_step_closures()


def _mark_step_if_lazy(device_str=""):
    if is_lazy():
        mark_step(device_str)
