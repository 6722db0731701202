"""``paca backends``: the listing's text and JSON output, selection reasons and problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_plugins import install_broken, install_toy, make_distribution  # noqa: F401

from paca.cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["backends", *args])
    return code, capsys.readouterr().out


def row(out: str, name: str) -> list[str]:
    """The table row of backend ``name``, split into cells (marker cell dropped)."""
    for line in out.splitlines():
        cells = line.split()
        if cells[:2] == ["*", name] or cells[:1] == [name]:
            return cells[1:] if cells[0] == "*" else cells
    raise AssertionError(f"no row for {name!r} in:\n{out}")


def test_lists_builtins_and_the_auto_selection(capsys):
    code, out = run_cli(capsys)
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == [
        "NAME", "PROVIDED", "BY", "DEVICE", "PRIORITY", "API", "AVAILABLE", "CAPABILITIES"
    ]  # fmt: skip
    assert row(out, "cpu")[:7] == ["cpu", "paca", "0.1.0", "cpu", "0", "2.0", "yes"]
    assert any(line.startswith("*  cpu ") for line in out.splitlines())  # cpu is selected
    assert "selected: cpu (auto-detected (highest-priority available backend))" in out


def test_plugins_duplicates_errors_and_reasons(capsys, plugin_path):
    install_toy(plugin_path, "paca-toy")
    install_toy(plugin_path, "paca-toy-fork", "toy_fork_plugin")
    install_broken(plugin_path)
    code, out = run_cli(capsys)
    assert code == 0
    assert row(out, "toy")[1] in ("paca-toy", "paca-toy-fork") and row(out, "toy")[2] == "1.2.3"
    assert row(out, "toy")[4] == "-"  # priority None: only by name
    assert "toy-off: not available: no toy device attached" in out
    assert "flaky: not available: is_available() raised OSError: driver crashed" in out
    dup = next(line for line in out.splitlines() if line.startswith("duplicate:"))
    assert "backend 'toy'" in dup and "paca-toy 1.2.3" in dup and "paca-toy-fork 1.2.3" in dup
    assert "(used)" in dup and "(ignored)" in dup
    assert (
        "plugin error: plugin 'import_error' from distribution paca-broken 1.2.3: failed to "
        "import 'broken_import_error': ImportError: vendor SDK missing"
    ) in out
    assert "plugin error: plugin 'hook_raises' from distribution paca-broken 1.2.3" in out
    assert "Warning" not in out  # problems are listed once, not also as warnings


def test_selection_reasons_env_and_explicit(capsys, plugin_path, monkeypatch):
    install_toy(plugin_path)
    monkeypatch.setenv("PACA_BACKEND", "toy")
    code, out = run_cli(capsys)
    assert code == 0 and "selected: toy (environment (PACA_BACKEND=toy))" in out
    assert any(line.startswith("*  toy ") for line in out.splitlines())

    code, out = run_cli(capsys, "--backend", "cpu")
    assert code == 0 and "selected: cpu (explicit (--backend))" in out

    code, out = run_cli(capsys, "--backend", "toy-off")
    assert code == 1
    assert "cannot be used: 'toy-off' is not available here: no toy device attached" in out

    monkeypatch.setenv("PACA_BACKEND", "tpu")
    code, out = run_cli(capsys)
    assert code == 1 and "no installed plugin provides a backend named 'tpu'" in out


def test_blocked_and_autoload_notes(capsys, plugin_path, monkeypatch):
    install_toy(plugin_path)
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "paca-toy")
    _, out = run_cli(capsys)
    assert "blocked: plugin 'toy' from distribution paca-toy 1.2.3" in out
    assert "toy" not in {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    monkeypatch.delenv("PACA_BLOCKED_BACKENDS")
    monkeypatch.setenv("PACA_DISABLE_PLUGIN_AUTOLOAD", "1")
    from paca._registry import reset_registry

    reset_registry()
    _, out = run_cli(capsys)
    assert "note: PACA_DISABLE_PLUGIN_AUTOLOAD is set" in out
    assert "paca-toy" not in out


def test_json_output(capsys, plugin_path):
    install_toy(plugin_path)
    code, out = run_cli(capsys, "--json")
    data = json.loads(out)
    assert code == 0 and data["selected"] == "cpu" and data["why"].startswith("auto-detected")
    rows = {b["name"]: b for b in data["backends"]}
    assert rows["cpu"]["selected"] and not rows["toy"]["selected"]
    assert rows["toy"]["distribution"] == "paca-toy" and rows["toy"]["version"] == "1.2.3"
    assert rows["toy-off"]["reason"] == "no toy device attached"
    assert data["plugin_errors"] == [] and data["duplicates"] == [] and data["problem"] is None


@pytest.mark.slow
def test_python_dash_m_paca_backends_in_a_fresh_process(tmp_path):
    make_distribution(
        tmp_path, "paca-broken", {"broken": "broken_mod"}, {"broken_mod": "raise ImportError('x')"}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["PACA_BACKEND"] = "cpu"
    run = subprocess.run(
        [sys.executable, "-m", "paca", "backends"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "selected: cpu (environment (PACA_BACKEND=cpu))" in run.stdout
    assert "plugin error: plugin 'broken' from distribution paca-broken 1.2.3" in run.stdout
    assert "PluginLoadWarning" not in run.stderr


@pytest.mark.slow
def test_check_runs_the_conformance_suite_and_fails_on_a_broken_plugin(capsys, plugin_path):
    make_distribution(
        plugin_path,
        "paca-sloppy",
        {"sloppy": "sloppy_plugin"},
        {
            "sloppy_plugin": """
                from paca.hookspecs import hookimpl
                from paca_cpu import CPUBackend

                class Sloppy(CPUBackend):
                    name = "sloppy"
                    def write_columns(self, weight, idx, columns):
                        weight.index_copy_(1, idx, columns.to(weight.dtype) * 0)  # wrong values

                @hookimpl
                def paca_backends():
                    return [Sloppy]
            """
        },
    )
    code, out = run_cli(capsys, "--check", "sloppy", "--no-compile")
    assert code == 1
    assert out.startswith("paca backend conformance: 'sloppy' on cpu:")
    failed = [line for line in out.splitlines() if line.lstrip().startswith("FAILED")]
    assert failed and any("write_columns" in line for line in failed)  # names the member
    assert "PASSED" in out and "SKIPPED compile" in out
