"""Conformance suite for paca backends: check a backend against a dense reference.

Correct results are defined by a dense autograd computation in fp64 on the CPU
(:mod:`paca.testing._reference`), never by another backend. Every failure names the
backend member that broke (``delta_grad``, ``write_columns``, ``linear_forward`` ...).

Three ways to run it, all checking the same contract items (:data:`CONTRACT`):

* from code: ``report = paca.testing.check_backend("mydev")``; ``print(report)`` shows
  every item, ``report.ok`` says whether all passed, ``report.raise_for_failures()``
  raises naming the failed items, members and why; ``extra_shapes=[LinearShape(...)]``
  adds your own shapes;
* from the shell: ``paca backends --check mydev``;
* from pytest, in the backend's own test suite::

      # tests/test_conformance.py
      import pytest
      from paca.testing.conformance import *  # noqa: F401,F403

      @pytest.fixture
      def paca_backend_name():
          return "mydev"

  which gives one test per contract item (``test_paca_contract[shapes[bfloat16]]``),
  or ``pytest -p paca.testing.pytest_plugin --paca-backend mydev`` with the same module.

See ``docs/writing-a-backend.md`` for what each item checks, the tolerances and a
walk-through.
"""

from __future__ import annotations

from paca.testing import (  # noqa: F401  (importing the check modules registers the items)
    _checks_capabilities,
    _checks_declarations,
    _checks_layers,
    _checks_members,
    _checks_nf4,  # "nf4": imports bitsandbytes only when run
)
from paca.testing._cases import ConvShape, LinearShape
from paca.testing._contract import (
    CONTRACT,
    TOLERANCES,
    CheckContext,
    ContractItem,
    ContractSkip,
    ContractViolation,
    reorder,
)
from paca.testing.report import (
    API_LABEL,
    CheckResult,
    ConformanceError,
    ConformanceReport,
    check_backend,
)

#: The order the suite runs and reports the items: declarations, members, layers, capabilities.
reorder(
    (
        "_checks_declarations",
        "_checks_members",
        "_checks_layers",
        "_checks_capabilities",
        "_checks_nf4",
    )
)

__all__ = [
    "API_LABEL",
    "CONTRACT",
    "TOLERANCES",
    "CheckContext",
    "CheckResult",
    "ConformanceError",
    "ConformanceReport",
    "ContractItem",
    "ContractSkip",
    "ContractViolation",
    "ConvShape",
    "LinearShape",
    "check_backend",
]
