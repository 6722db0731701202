"""The embedded default job is a real fine-tune: a pretrained model improves on a shifted domain."""

from __future__ import annotations

import math

import pytest

from paca.cli.main import main
from paca.quickstart import QuickstartSettings, default_experiment, run_quickstart


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The default job's model is tiny: on a busy 2-core box two threads are 3-8x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.mark.slow
def test_side_by_side_runs_paca_and_lora_on_the_default_and_writes_the_comparison(tmp_path):
    from paca.experiment.side_by_side import DEFAULT_PAIR
    from paca.experiment.side_by_side import main as side_by_side

    assert DEFAULT_PAIR == ("tiny", "tiny-lora")
    paca_side = default_experiment().to_dict()
    from paca.experiment.schema import load_experiment, shipped_experiments

    other = load_experiment(shipped_experiments()["tiny-lora"]).to_dict()
    assert other["method"]["name"] == "lora" and other["model"] == paca_side["model"]
    assert (
        other["data"] == paca_side["data"]
        and other["train"]["steps"] == paca_side["train"]["steps"]
    )
    args = ["--steps", "6", "--set", "data.max_eval_samples=32",
            "--set", "train.throughput_warmup_steps=1", "--out", str(tmp_path)]  # fmt: skip
    assert side_by_side(args) == 0
    md = (tmp_path / "compare.md").read_text()
    assert "| tiny | cpu" in md and "| tiny-lora | cpu" in md and "lora" in md
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert side_by_side(args) == 1  # runs are never overwritten
