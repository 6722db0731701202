"""Conformance suite for paca backends: check a backend against the CPU reference.

Two ways to run it, both checking the same contract items (:data:`CONTRACT`):

* from code: ``report = paca.testing.check_backend("mydev")``; ``print(report)`` shows
  every item, ``report.ok`` says whether all passed, ``report.raise_for_failures()``
  raises naming the failed items and why;
* from pytest, in the backend's own test suite::

      # tests/test_conformance.py
      import pytest
      from paca.testing.conformance import *  # noqa: F401,F403

      @pytest.fixture
      def paca_backend_name():
          return "mydev"

  which gives one test per contract item (``test_paca_contract[op_delta_grad[bfloat16]]``),
  or ``pytest -p paca.testing.pytest_plugin --paca-backend mydev`` with the same module.

See ``docs/writing-a-backend.md`` for the contract, tolerances and a walk-through.
"""

from __future__ import annotations

from paca.backend_abc import Backend as _Backend
from paca.testing import _checks_op, _checks_primitives  # noqa: F401  (registers items)

if hasattr(_Backend, "conv2d"):  # the conv primitives joined the Backend API
    from paca.testing import _checks_conv  # noqa: F401
from paca.testing import _checks_runtime  # noqa: F401, E402
from paca.testing import _checks_nf4  # noqa: F401, E402  ("nf4": bitsandbytes, lazily)
from paca.testing._contract import (
    CONTRACT,
    TOLERANCES,
    CheckContext,
    ContractItem,
    ContractSkip,
    ContractViolation,
)
from paca.testing.report import (
    CheckResult,
    ConformanceError,
    ConformanceReport,
    check_backend,
)

__all__ = [
    "CONTRACT",
    "TOLERANCES",
    "CheckContext",
    "CheckResult",
    "ConformanceError",
    "ConformanceReport",
    "ContractItem",
    "ContractSkip",
    "ContractViolation",
    "check_backend",
]
