"""The conformance suite as pytest tests: star-import this module into a test file.

    from paca.testing.conformance import *  # noqa: F401,F403

    @pytest.fixture
    def paca_backend_name():
        return "mydev"      # or a Backend subclass or instance

You get ``test_paca_contract``, parametrised over every contract item; a failure names
the item and says why, an item that does not apply (e.g. bf16 on a backend that does
not declare ``"bfloat16"``) is skipped with the reason. Without an overriding fixture the
backend comes from ``--paca-backend NAME`` (with ``-p paca.testing.pytest_plugin``) or the
``PACA_CONFORMANCE_BACKEND`` environment variable. Override ``paca_device`` to test a
device other than ``backend.device()``, and ``paca_conformance_options`` to pass
``tolerances=``, ``run_compile=False``, ``seed=``, ``generated=`` or ``extra_shapes=``
(your own :class:`paca.testing.LinearShape` / :class:`paca.testing.ConvShape`).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from paca.backend_abc import Backend
from paca.testing import CONTRACT
from paca.testing.report import (
    API_LABEL,
    make_context,
    resolve_backend,
    result_without_instance,
    run_item,
)

ENV_VAR = "PACA_CONFORMANCE_BACKEND"

__all__ = [
    "paca_backend_name",
    "paca_conformance_options",
    "paca_device",
    "test_paca_contract",
]


@pytest.fixture
def paca_backend_name(request: pytest.FixtureRequest) -> str | Backend | type[Backend]:
    """The backend under test. Override this fixture in your test module."""
    name = request.config.getoption("paca_backend", None) or os.environ.get(ENV_VAR)
    if not name:
        pytest.fail(
            "no backend to check: define a `paca_backend_name` fixture returning your backend's "
            f"name, pass `-p paca.testing.pytest_plugin --paca-backend NAME`, or set {ENV_VAR}",
            pytrace=False,
        )
    return name


@pytest.fixture
def paca_device() -> Any:
    """The device to test on; ``None`` means ``backend.device()``."""
    return None


@pytest.fixture
def paca_conformance_options() -> dict[str, Any]:
    """Extra keywords for the check context: ``tolerances``, ``run_compile``, ``seed``,
    ``generated``, ``extra_shapes``."""
    return {}


@pytest.mark.parametrize("paca_contract_item", list(CONTRACT))
def test_paca_contract(
    paca_contract_item: str,
    paca_backend_name: str | Backend | type[Backend],
    paca_device: Any,
    paca_conformance_options: dict[str, Any],
) -> None:
    """One contract item of the paca Backend API (see paca.testing.CONTRACT)."""
    found = resolve_backend(paca_backend_name)
    if found.instance is None:
        result = result_without_instance(found, paca_contract_item)
    else:
        ctx = make_context(
            found.instance, paca_device, registered=found.registered, **paca_conformance_options
        )
        result = run_item(paca_contract_item, ctx)
    if result.status == "skipped":
        pytest.skip(f"{paca_contract_item}: {result.message}")
    if result.status == "failed":
        member = f" in {result.member}" if result.member else ""
        pytest.fail(
            f"backend {found.cls.name!r} breaks contract item {paca_contract_item!r}{member} "
            f"({result.title}; {API_LABEL}): {result.message}",
            pytrace=False,
        )
