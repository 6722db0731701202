"""``paca run EXP --nproc 2``: one experiment file, two ranks, killed, resumed, compared.

The experiment runs once in this process and once as ``paca run --nproc 2`` (which
starts torchrun itself: DDP through ``PacaTrainer``, gloo on CPU). The 2-rank run is
killed (SIGKILL to the launcher and its ranks) once its first checkpoint exists, then
continued with ``paca run --resume`` (which relaunches 2 ranks, as the run folder
recorded). Checked: the run folder records the world size and strategy, the resumed
2-rank run's losses equal the 1-process run's step for step ([train].batch_size is the
global batch), DDP did not warn about unused parameters, and ``paca compare`` puts the
two runs side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import kill_tree  # noqa: E402

TIMEOUT = float(os.environ.get("PACA_DIST_TEST_TIMEOUT", "75"))
STEPS, SAVE_EVERY = 24, 4

EXPERIMENT = f"""
name = "dist"
seed = 0
backend = "cpu"

[model]
name = "paca.tiny/tiny-llama"

[data]
train = "paca.tiny/instructions"
seq_len = 32
max_train_samples = 256
max_eval_samples = 8

[method]
name = "paca"
r = 4
target_modules = ["q_proj", "v_proj", "down_proj"]

[train]
steps = {STEPS}
batch_size = 4
lr = 1e-2
max_grad_norm = 0.0
logging_steps = 1
save_steps = {SAVE_EVERY}
save_total_limit = 1
"""


def _paca(log: Path, *args: str) -> subprocess.Popen:
    """``python -m paca ARGS`` with its output in ``log`` (a pipe nobody reads could fill)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PACA_BACKEND": "cpu"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "paca", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _finish(proc: subprocess.Popen, log: Path, what: str) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"{what} did not finish in {TIMEOUT:.0f}s:\n{_tail(log)}")
    assert proc.returncode == 0, f"{what} failed:\n{_tail(log)}"
    return log.read_text(errors="replace")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_and_matches_one_process(tmp_path):
    from paca.experiment.compare import compare
    from paca.experiment.runner import run_experiment
    from paca.experiment.schema import load_experiment

    exp_file = tmp_path / "dist.toml"
    exp_file.write_text(EXPERIMENT)
    two = tmp_path / "two"
    # 2 ranks, killed (launcher, torchrun and both ranks) once a checkpoint is complete
    first_log, resume_log = tmp_path / "first.log", tmp_path / "resume.log"
    proc = _paca(
        first_log, "run", str(exp_file), "--nproc", "2", "--run-dir", str(two), "--no-progress"
    )
    checkpoints = two / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(
                f"no checkpoint before the 2-rank run ended or timed out:\n{_tail(first_log)}"
            )
        time.sleep(0.02)
    kill_tree(proc)
    killed = json.loads((two / "summary.json").read_text())
    assert killed["status"] == "running" and killed["world_size"] == 2, killed
    assert killed.get("steps", 0) < STEPS, "the run finished before it could be killed"

    # resume: 2 ranks again, because the run folder says it ran on 2
    resumed = _paca(resume_log, "run", "--resume", str(two), "--no-progress")
    log = _finish(resumed, resume_log, "paca run --resume")
    assert "find_unused_parameters=True" not in log  # PacaTrainer turns it off for PaCA
    summary = json.loads((two / "summary.json").read_text())
    env = json.loads((two / "environment.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["resumed_from"].startswith("checkpoints/checkpoint-")
    assert (summary["world_size"], summary["strategy"]) == (2, "ddp")
    assert (env["world_size"], env["strategy"]) == (2, "ddp")

    # the same experiment in one process (here)
    one = run_experiment(load_experiment(exp_file), run_dir=tmp_path / "one", progress=False)
    assert (one.summary["world_size"], one.summary["strategy"]) == (1, "single")
    want, got = _losses(tmp_path / "one"), _losses(two)
    assert len(got) == len(want) == STEPS
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)

    table = compare([tmp_path / "one", two], out_dir=tmp_path / "cmp", png=False)["table"]
    lines = table.splitlines()
    assert "ranks" in lines[0]
    assert any(" 1 " in line and line.startswith("one") for line in lines)
    assert any("2 ddp" in line and line.startswith("two") for line in lines)


@pytest.mark.slow
def test_bad_world_sizes_and_strategies_fail_before_anything_runs(tmp_path, capsys, monkeypatch):
    from paca.cli.main import main

    exp_file = tmp_path / "dist.toml"
    exp_file.write_text(EXPERIMENT.replace("batch_size = 4", "batch_size = 5"))
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before any process group exists
        assert main(["run", str(exp_file), "--run-dir", str(tmp_path / "r")]) == 1
        err = capsys.readouterr().err
        assert "[train].batch_size = 5 does not split evenly over 2 processes" in err, err
        assert "multiple of 2" in err
        exp_file.write_text(EXPERIMENT)
        f = tmp_path / "f"
        assert main(["run", str(exp_file), "--strategy", "fsdp2", "--run-dir", str(f)]) == 1
        err = capsys.readouterr().err
        assert "on CPU" in err and "fully_shard_layers" in err, err
        assert not (tmp_path / "r").exists() and not f.exists()  # refused before any folder
    assert main(["run", str(exp_file), "--nproc", "0"]) == 1
    assert "--nproc must be at least 1" in capsys.readouterr().err
