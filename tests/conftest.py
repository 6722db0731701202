"""Shared fixtures: a clean backend registry per test, and hardware markers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_SDK = ROOT / "tests" / "fake_sdk"


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with no backend chosen and nothing discovered."""
    from paca._registry import reset_registry

    for var in ("PACA_BACKEND", "PACA_DISABLE_PLUGIN_AUTOLOAD", "PACA_BLOCKED_BACKENDS"):
        monkeypatch.delenv(var, raising=False)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path where tests create fake installed distributions."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def _no_leaked_mixed_precision():
    """transformers 4.x ``TrainingArguments(bf16=True)`` sets ``ACCELERATE_MIXED_PRECISION``
    in ``os.environ`` for good: every later Trainer in the process would autocast."""
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    yield
    if before is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = before


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    from paca.environment import env_flag

    has_cuda = torch.cuda.is_available()
    has_hpu = env_flag("PACA_REAL_HPU")  # never set with the fake SDK
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda unavailable)"))
        if "hpu" in item.keywords and not has_hpu:
            item.add_marker(
                pytest.mark.skip(reason="needs a real Intel Gaudi (set PACA_REAL_HPU=1 there)")
            )


def pytest_configure(config: pytest.Config) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
