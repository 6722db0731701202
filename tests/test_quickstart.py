"""The embedded default job trains for real: the held-out loss goes down."""

from __future__ import annotations

import pytest

from paca.cli.main import main
from paca.quickstart import QuickstartSettings, run_quickstart


def test_default_job_lowers_the_loss():
    result = run_quickstart(QuickstartSettings(steps=40), progress=False)
    assert result["backend"] == "cpu"
    assert result["loss_after"] < result["loss_before"] - 0.3
    assert 0 < result["trainable_params"] < result["total_params"] * 0.2


@pytest.mark.slow
def test_paca_run_command_prints_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare `paca run` writes its run folder under ./runs
    assert main(["run", "--steps", "20", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss:" in out and "trainable params:" in out
