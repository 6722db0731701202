"""A command line that never shows a traceback for a user's mistake (issue 12, part 6).

Each mistake exits 1 (130 for Ctrl-C) with one or two lines on stderr naming the problem
and the fix; ``--debug`` / ``PACA_DEBUG=1`` shows the traceback; a closed stdout ends the
command quietly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_experiment import tiny_experiment

from paca.cli.main import format_error, main
from paca.experiment.schema import dumps_toml


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACA_")}
    env.update(extra)
    return env


def paca_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paca", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
    )


def fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """``main(argv)`` exits 1 with one or two lines on stderr containing ``expected``."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("paca ")]
    assert lines and len(err.splitlines()) <= 2, err
    for text in expected:
        assert text in err, err
    return err


def write_experiment(tmp: Path, **sections) -> Path:
    path = tmp / "exp.toml"
    path.write_text(dumps_toml(tiny_experiment(tmp, **sections)))
    return path


# --------------------------------------------------------------------------- paca run
def test_existing_run_dir_is_refused_with_the_fix(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "completed"}')
    fails_cleanly(
        capsys,
        ["run", str(write_experiment(tmp_path)), "--backend", "cpu", "--run-dir", str(run_dir)],
        "already holds a run",
        "--resume",
    )


def test_run_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    fails_cleanly(
        capsys,
        ["run", str(write_experiment(tmp_path)), "--run-dir", str(target)],
        "--run-dir",
        "is a file",
    )


def test_unknown_experiment_name_lists_the_shipped_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_cleanly(capsys, ["run", "no-such-experiment"], "no-such-experiment", "tiny")
    (tmp_path / "folder").mkdir()
    fails_cleanly(capsys, ["run", "folder"], "is a folder", "--resume")


def test_bad_toml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = ")
    fails_cleanly(capsys, ["run", str(bad)], str(bad), "not valid TOML")


def test_unknown_backend_names(tmp_path, capsys):
    exp = str(write_experiment(tmp_path))
    fails_cleanly(capsys, ["run", exp, "--backend", "nope"], "unknown paca backend 'nope'")
    fails_cleanly(
        capsys,
        ["bench", "--preset", "tiny", "--backend", "nope", "--no-chart", "--no-progress",
         "--out", str(tmp_path / "b")],
        "unknown paca backend 'nope'",
    )  # fmt: skip
    assert main(["backends", "--backend", "nope"]) == 1
    assert "no installed plugin provides a backend named 'nope'" in capsys.readouterr().out


def test_blocked_default_backend_at_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "cpu")
    fails_cleanly(
        capsys, ["run", str(write_experiment(tmp_path))], "blocked by PACA_BLOCKED_BACKENDS=cpu"
    )


def test_environment_backend_is_named_in_the_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACA_BACKEND", "tpu")
    fails_cleanly(capsys, ["run", str(write_experiment(tmp_path))], "PACA_BACKEND=tpu is set")


def test_resume_of_a_fabricated_completed_run_refuses(tmp_path, capsys):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    exp = write_experiment(tmp_path)
    (run_dir / "experiment.toml").write_text(exp.read_text())
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "steps": 6}))
    fails_cleanly(capsys, ["run", "--resume", str(run_dir)], "already completed", "6 steps")
    (run_dir / "summary.json").write_text("{not json")
    fails_cleanly(capsys, ["run", "--resume", str(run_dir)], "summary.json", "not valid JSON")
    fails_cleanly(capsys, ["run", "--resume", str(exp)], "is a file")


@pytest.mark.slow
def test_resume_of_a_completed_run_refuses_and_keeps_its_adapter(tmp_path, capsys):
    run_dir = tmp_path / "r"
    exp = write_experiment(tmp_path, train={"steps": 2, "save_steps": 1})
    assert (
        main(["run", str(exp), "--backend", "cpu", "--no-progress", "--run-dir", str(run_dir)]) == 0
    )
    capsys.readouterr()
    files = {p: p.read_bytes() for p in sorted((run_dir / "adapter").rglob("*")) if p.is_file()}
    summary = (run_dir / "summary.json").read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert files
    fails_cleanly(capsys, ["run", "--resume", str(run_dir)], "already completed", "2 steps")
    assert {p: p.read_bytes() for p in files} == files  # the adapter is untouched
    assert (run_dir / "summary.json").read_bytes() == summary
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_bad_override(capsys):
    fails_cleanly(capsys, ["run", "--set", "train.lr"], "expected KEY=VALUE")


# ------------------------------------------------------------------ compare and bench
def test_a_file_as_out_is_refused_before_any_work(tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    fails_cleanly(capsys, ["compare", str(tmp_path), "--out", str(taken)], "--out", "is a file")
    fails_cleanly(
        capsys,
        ["bench", "--preset", "tiny", "--no-chart", "--no-progress", "--out", str(taken)],
        "--out",
        "is a file",
    )
    fails_cleanly(capsys, ["compare", str(tmp_path), "--out", str(taken / "sub")], "is a file")


def test_compare_of_a_folder_that_is_no_run(tmp_path, capsys):
    fails_cleanly(capsys, ["compare", str(tmp_path), "--no-plot", "--out", str(tmp_path / "o")],
                  "is not a run folder")  # fmt: skip


def test_bench_from_json_mistakes(tmp_path, capsys):
    out = str(tmp_path / "o")
    fails_cleanly(capsys, ["bench", "--from-json", str(tmp_path / "missing.json"), "--out", out],
                  "no such file")  # fmt: skip
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    fails_cleanly(capsys, ["bench", "--from-json", str(broken), "--out", out], "not valid JSON")
    broken.write_text("[1, 2]")
    fails_cleanly(capsys, ["bench", "--from-json", str(broken), "--out", out], "is not a")
    fails_cleanly(capsys, ["bench", "--seq-points", "a,b", "--out", out], "--seq-points")


# ------------------------------------------------------------------------ paca backends
def test_check_of_unknown_or_unavailable_backend(capsys, plugin_path):
    from test_plugins import install_toy

    install_toy(plugin_path)
    fails_cleanly(capsys, ["backends", "--check", "nope"], "unknown paca backend 'nope'")
    fails_cleanly(capsys, ["backends", "--check", "toy-off"], "not available here", "no toy device")
    import torch

    if not torch.cuda.is_available():
        fails_cleanly(capsys, ["backends", "--check", "cuda"], "'cuda' is not available here")


@pytest.mark.slow
def test_check_unknown_in_a_fresh_process_is_one_line():
    run = paca_cli("backends", "--check", "nope")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "unknown paca backend 'nope'" in run.stderr


@pytest.mark.slow
def test_broken_pipe_exits_quietly():
    """``paca backends | head``: the reader is gone before paca writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "paca", "backends"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    proc.stdout.close()  # like `head` exiting at once
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err and not err.strip()


@pytest.mark.slow
def test_broken_pipe_with_head_in_a_shell(tmp_path):
    run = subprocess.run(
        f"'{sys.executable}' -m paca backends --json | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr


# ------------------------------------------------------------------ the handler itself
def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "run", "--resume", str(tmp_path / "none")])
    monkeypatch.setenv("PACA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["run", "--resume", str(tmp_path / "none")])
    monkeypatch.delenv("PACA_DEBUG")
    fails_cleanly(capsys, ["run", "--resume", str(tmp_path / "none")], "experiment.toml not found")


@pytest.mark.slow
def test_paca_debug_in_a_fresh_process(tmp_path):
    quiet = paca_cli("run", str(tmp_path / "none.toml"))
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    loud = paca_cli("run", str(tmp_path / "none.toml"), PACA_DEBUG="1")
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_ctrl_c_exits_130(monkeypatch, capsys):
    import paca.cli.backends as backends_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(backends_cli, "run", interrupted)
    assert main(["backends"]) == 130
    assert capsys.readouterr().err.strip() == "paca backends: interrupted"


def test_unexpected_errors_are_two_lines_with_the_debug_hint(monkeypatch, capsys):
    import paca.cli.backends as backends_cli

    def buggy(args):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(backends_cli, "run", buggy)
    err = fails_cleanly(capsys, ["backends"], "AttributeError", "--debug", "PACA_DEBUG=1")
    assert len(err.splitlines()) == 2


def test_os_errors_read_like_sentences():
    exc = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert format_error("run", exc) == "paca run: error: No such file or directory: /x/y"
    assert format_error("run", KeyError("k")) == "paca run: error: KeyError: 'k'"
    assert format_error(None, ValueError("")) == "paca: error: ValueError"
