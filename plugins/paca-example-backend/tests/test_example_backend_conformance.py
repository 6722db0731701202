"""The paca conformance suite, run on the installed ``trace`` backend.

This is all a third-party backend needs: star-import the suite, name the backend.
"""

from __future__ import annotations

import pytest
from paca.testing.conformance import *  # noqa: F403


@pytest.fixture
def paca_backend_name() -> str:
    import paca

    names = {i.name: i for i in paca.list_backends()}
    if "trace" not in names or names["trace"].distribution != "paca-example-backend":
        pytest.fail(
            "the 'trace' backend is not installed through its entry point; run "
            "`pip install -e plugins/paca-example-backend` in this environment",
            pytrace=False,
        )
    return "trace"
