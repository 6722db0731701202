"""The embedded default job is a real fine-tune: a pretrained model improves on a shifted domain."""

from __future__ import annotations

import math

import pytest

from paca.cli.main import main
from paca.quickstart import QuickstartSettings, default_experiment, run_quickstart


def test_default_job_fine_tunes_the_pretrained_model_on_a_shifted_domain():
    exp = default_experiment()
    assert exp.model.name == "paca.tiny/code-llama"  # pretrained on stdlib code ...
    assert exp.data.train == "paca.data/python-docs"  # ... fine-tuned on English docs
    result = run_quickstart(QuickstartSettings(steps=30, eval_examples=64), progress=False)
    assert result["backend"] == "cpu"
    # pretrained: far below chance (ln 259 = 5.56 nats per byte) before any fine-tuning
    assert result["loss_before"] < 2.5 < math.log(259)
    # and fine-tuning on the new domain improves it on held-out topics
    assert result["loss_after"] < result["loss_before"] - 0.05
    assert result["accuracy_after"] > result["accuracy_before"]
    assert 0 < result["trainable_params"] < result["total_params"] * 0.2


@pytest.mark.slow
def test_paca_run_command_prints_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare `paca run` writes its run folder under ./runs
    assert main(["run", "--steps", "20", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "held-out loss:" in out and "trainable params:" in out
