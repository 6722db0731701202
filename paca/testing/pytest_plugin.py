"""pytest plugin adding ``--paca-backend NAME`` for :mod:`paca.testing.conformance`.

Load it with ``pytest -p paca.testing.pytest_plugin`` or
``pytest_plugins = ["paca.testing.pytest_plugin"]`` in a root ``conftest.py``. It is not
auto-loaded, so installing paca never changes other projects' pytest runs.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("paca", "paca backend conformance")
    group.addoption(
        "--paca-backend",
        dest="paca_backend",
        default=None,
        metavar="NAME",
        help="backend (registered name) that paca.testing.conformance checks",
    )
