"""Each test starts with no backend-selecting env vars and ends with auto-detection again.

If the package is not installed, its source is put on ``sys.path`` so the unit tests
still run; the tests that need the ``paca.backends`` entry point then fail and say
``pip install -e plugins/paca-example-backend``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("paca_example_backend") is None:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch: pytest.MonkeyPatch):
    """No backend-selecting env vars, and auto-detection again after each test (public API
    only: ``paca.use_backend(None)``)."""
    import paca

    for var in ("PACA_BACKEND", "PACA_DISABLE_PLUGIN_AUTOLOAD", "PACA_BLOCKED_BACKENDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PACA_TRACE_CHECK_FINITE", raising=False)
    yield
    paca.use_backend(None)
