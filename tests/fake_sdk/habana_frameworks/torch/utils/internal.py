"""Fake ``habana_frameworks.torch.utils.internal`` (``is_lazy``, ``lazy_only``).

The real ``is_lazy()`` re-reads ``os.getenv("PT_HPU_LAZY_MODE", <default>)`` on every call,
with ``<default>`` = ``"1"`` in bridges up to SW 1.20 and ``"0"`` from 1.21
(gaudi-facts.md section 2). The execution mode itself, however, is fixed when
``habana_frameworks.torch`` loads its plugin library. The fake returns that import-time
mode and warns when the environment has drifted from it since import: code that flips
``PT_HPU_LAZY_MODE`` after importing the SDK has a bug on real hardware too.
"""

import logging
import os
import warnings

from habana_frameworks import _fake_config

logger = logging.getLogger(__name__)

_drift_warned = False


def _check_env_drift() -> None:
    global _drift_warned
    now = os.environ.get("PT_HPU_LAZY_MODE")
    if now != _fake_config.LAZY_MODE_ENV and not _drift_warned:
        _drift_warned = True
        warnings.warn(
            "PT_HPU_LAZY_MODE changed after habana_frameworks.torch was imported "
            f"({_fake_config.LAZY_MODE_ENV!r} -> {now!r}); the mode is fixed at import "
            "(the plugin library is already loaded), so the change has no effect.",
            RuntimeWarning,
            stacklevel=3,
        )


def is_lazy() -> bool:
    """True in lazy mode (``PT_HPU_LAZY_MODE`` != "0", default chosen by the release)."""
    _check_env_drift()
    return _fake_config.LAZY


def lazy_only(func):
    """Real-bridge decorator: run ``func`` only in lazy mode, else log and do nothing."""

    def wrapper(*args, **kwargs):
        if is_lazy():
            return func(*args, **kwargs)
        logger.info(
            f"Call {func.__name__} function will not have any effect. It's lazy mode only functionality."
        )
        return None

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper
