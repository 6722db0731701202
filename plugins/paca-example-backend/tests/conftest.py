"""Each test starts with a fresh paca registry and no backend-selecting env vars."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch: pytest.MonkeyPatch):
    from paca._registry import reset_registry

    for var in ("PACA_BACKEND", "PACA_DISABLE_PLUGIN_AUTOLOAD", "PACA_BLOCKED_BACKENDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PACA_TRACE_CHECK_FINITE", raising=False)
    reset_registry()
    yield
    reset_registry()
