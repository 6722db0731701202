"""Auto-selection a plugin cannot hijack (issue 12, part 4).

A third-party backend is auto-selected only when its own class declares a priority above
the available built-ins', it is available and it constructs. Ties have a documented rule
(built-ins win; equal third parties are not picked between), a backend that fails to
construct is skipped with a warning naming its plugin and distribution, and anything a
plugin raises (SystemExit and KeyboardInterrupt included) is a plugin failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import pytest
from helpers import make_distribution

import paca
from paca._registry import (
    AUTO_RULE,
    BackendBuildError,
    EntryPointNameWarning,
    PluginLoadWarning,
    SelectionWarning,
    api_incompatibility,
    registry,
)
from paca.cli.main import main


def install(root: Path, dist: str, body: str, backends: dict[str, str]) -> str:
    """A fake distribution ``dist`` whose plugin module defines ``body`` (classes) and
    returns ``backends`` (backend name -> class name), one entry point per backend.

    Module names are unique: ``sys.modules`` outlives a test, file contents do not.
    """
    module = f"sel_{dist.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    source = (
        "from paca.hookspecs import hookimpl\n"
        "from paca_cpu import CPUBackend\n"
        "from paca.backend_abc import Backend\n"
        + textwrap.dedent(body)
        + "\n@hookimpl\ndef paca_backends():\n"
        + f"    return [{', '.join(backends.values())}]\n"
    )
    make_distribution(root, dist, dict.fromkeys(backends, module), {module: source})
    return module


def infos() -> dict[str, paca.BackendInfo]:
    return {i.name: i for i in paca.list_backends()}


# --------------------------------------------------------------------- inherited priority
@pytest.mark.parametrize("name", ["aaa-fork", "zzz-fork"])  # sorts before and after "cpu"
def test_cpu_subclass_inheriting_priority_0_is_never_auto_selected(plugin_path, name):
    install(
        plugin_path, "paca-fork", f"class Fork(CPUBackend):\n    name = {name!r}\n", {name: "Fork"}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: it simply does not take part
        assert paca.get_backend().name == "cpu"
    fork = infos()[name]
    assert fork.available and fork.priority == 0 and not fork.auto_selectable
    assert "inherited from CPUBackend" in fork.auto_note
    assert paca.use_backend(name).name == name  # by name it works as ever


def test_priority_inherited_from_a_third_party_base_does_not_count(plugin_path):
    install(
        plugin_path,
        "paca-family",
        """
        class Base(CPUBackend):
            name = "base"
            priority = 1000
        class Child(Base):
            name = "child"
        """,
        {"base": "Base", "child": "Child"},
    )
    assert paca.get_backend().name == "base"  # declared its own: it takes part and wins
    assert (
        not infos()["child"].auto_selectable and "inherited from Base" in infos()["child"].auto_note
    )


def test_declared_priority_above_the_builtins_wins_and_is_reported(plugin_path, capsys):
    install(
        plugin_path, "paca-fast", "class Fast(CPUBackend):\n    name = 'fast'\n    priority = 500\n",
        {"fast": "Fast"},
    )  # fmt: skip
    assert paca.get_backend().name == "fast"
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "selected: fast (auto-detected" in out
    assert any(line.startswith("*  fast ") for line in out.splitlines())


def test_declared_priority_equal_to_a_builtin_loses_the_tie(plugin_path, capsys):
    install(
        plugin_path, "paca-tied", "class Tied(CPUBackend):\n    name = 'tied'\n    priority = 0\n",
        {"tied": "Tied"},
    )  # fmt: skip
    with pytest.warns(SelectionWarning, match="built-ins win ties"):
        assert paca.get_backend().name == "cpu"
    report = registry().auto_selection()
    assert report.name == "cpu" and "tied" not in report.order
    assert any("tied (paca-tied)" in t and "built-ins win ties" in t for t in report.ties)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "tie: tied (paca-tied) and the built-in cpu have priority 0" in out


def test_equal_third_party_priorities_are_not_picked_between(plugin_path, capsys):
    for dist, name in (("paca-one", "one"), ("paca-two", "two")):
        install(
            plugin_path, dist, f"class B(CPUBackend):\n    name = {name!r}\n    priority = 500\n",
            {name: "B"},
        )  # fmt: skip
    with pytest.warns(SelectionWarning) as caught:
        assert paca.get_backend().name == "cpu"
    text = " ".join(str(w.message) for w in caught)
    assert "one (paca-one), two (paca-two) all declare priority 500" in text
    assert "PACA_BACKEND=<name>" in text
    assert main(["backends", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["selected"] == "cpu" and data["auto_rule"] == AUTO_RULE
    assert any("all declare priority 500" in t for t in data["ties"])
    # a lower, unique third-party priority above the built-ins is still taken
    install(
        plugin_path, "paca-three", "class C(CPUBackend):\n    name = 'three'\n    priority = 400\n",
        {"three": "C"},
    )  # fmt: skip
    from paca._registry import reset_registry

    reset_registry()
    with pytest.warns(SelectionWarning):
        assert paca.get_backend().name == "three"


def test_only_by_name_and_non_int_priorities_never_take_part(plugin_path):
    install(
        plugin_path,
        "paca-odd",
        """
        class Named(CPUBackend):
            name = "named"
            priority = None
        class Truthy(CPUBackend):
            name = "truthy"
            priority = True
        class Texty(CPUBackend):
            name = "texty"
            priority = "9000"
        """,
        {"named": "Named", "truthy": "Truthy", "texty": "Texty"},
    )
    assert paca.get_backend().name == "cpu"
    rows = infos()
    assert not any(rows[n].auto_selectable for n in ("named", "truthy", "texty"))
    assert "not an int" in rows["texty"].auto_note and rows["texty"].priority is None


# ------------------------------------------------------------------- failing constructors
BROKEN_INIT = """
class Broken(CPUBackend):
    name = "broken"
    priority = 900
    def __init__(self):
        raise {exc}
"""


@pytest.mark.parametrize(
    "exc", ["RuntimeError('no device handle')", "SystemExit(3)", "KeyboardInterrupt()"]
)
def test_backend_failing_to_construct_is_skipped_with_its_plugin_named(plugin_path, exc):
    install(plugin_path, "paca-broken-init", BROKEN_INIT.format(exc=exc), {"broken": "Broken"})
    with pytest.warns(SelectionWarning) as caught:
        backend = paca.get_backend()
    assert backend.name == "cpu"
    text = " ".join(str(w.message) for w in caught)
    assert "skipped backend 'broken'" in text and "paca-broken-init 1.2.3" in text
    assert "plugin 'broken'" in text and "PACA_BLOCKED_BACKENDS=broken" in text
    assert exc.split("(")[0] in text
    report = registry().auto_selection()
    assert report.order[:2] == ["broken", "cpu"] and len(report.skipped) == 1
    # asked for by name, it fails with a clear error, not the raw exception
    with pytest.raises(BackendBuildError, match="could not be constructed"):
        paca.use_backend("broken")
    # and a default wrap works
    import torch

    model = paca.wrap(
        torch.nn.Sequential(torch.nn.Linear(4, 4)), paca.PacaConfig(r=1, target_modules=["0"])
    )
    assert model(torch.randn(2, 4)).shape == (2, 4) and paca.get_backend().name == "cpu"


def test_paca_backends_exit_status_follows_what_it_would_select(plugin_path, monkeypatch, capsys):
    install(
        plugin_path,
        "paca-broken-init",
        BROKEN_INIT.format(exc="OSError('x')"),
        {"broken": "Broken"},
    )
    assert main(["backends"]) == 0  # auto-selection skips it and selects cpu
    out = capsys.readouterr().out
    assert "selected: cpu (auto-detected" in out
    assert (
        "skipped: paca backend 'broken' (plugin 'broken' from distribution paca-broken-init" in out
    )
    monkeypatch.setenv("PACA_BACKEND", "broken")
    assert main(["backends"]) == 1  # the backend it would select cannot be built
    out = capsys.readouterr().out
    assert "cannot be used: paca backend 'broken'" in out and "could not be constructed" in out
    monkeypatch.delenv("PACA_BACKEND")
    assert main(["backends", "--backend", "broken"]) == 1
    capsys.readouterr()
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "cpu")  # nothing left that builds
    from paca._registry import reset_registry

    reset_registry()
    assert main(["backends"]) == 1
    out = capsys.readouterr().out
    assert "selected: none" in out and "blocked by PACA_BLOCKED_BACKENDS=cpu" in out


# ---------------------------------------------------------- BaseExceptions in plugin code
INTERRUPTING = {
    "import": "raise {exc}\n",
    "hook": """
        from paca.hookspecs import hookimpl
        @hookimpl
        def paca_backends():
            raise {exc}
    """,
    "available": """
        from paca.hookspecs import hookimpl
        from paca_cpu import CPUBackend
        class Flaky(CPUBackend):
            name = "{name}"
            priority = 1000
            @classmethod
            def is_available(cls):
                raise {exc}
        @hookimpl
        def paca_backends():
            return [Flaky]
    """,
}


@pytest.mark.parametrize("where", sorted(INTERRUPTING))
@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit(0)"])
def test_keyboardinterrupt_and_systemexit_in_plugin_code_are_plugin_failures(
    plugin_path, where, exc
):
    name = f"x{uuid.uuid4().hex[:6]}"
    module = f"intr_{name}"
    make_distribution(
        plugin_path,
        "paca-interrupting",
        {name: module},
        {module: INTERRUPTING[where].format(exc=exc, name=name)},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        assert paca.get_backend().name == "cpu"  # auto-selection survives
        rows = infos()
        errors = {r.name: r for r in registry().plugin_errors()}
    kind = exc.split("(")[0]
    if where == "available":
        assert not rows[name].available
        assert rows[name].reason.startswith(f"is_available() raised {kind}")
        assert "paca-interrupting" in rows[name].reason
    else:
        assert errors[name].distribution == "paca-interrupting"
        assert kind in errors[name].error
    assert paca.use_backend("cpu").name == "cpu"


@pytest.mark.slow
def test_a_real_ctrl_c_while_a_plugin_imports_still_interrupts(tmp_path):
    """SIGINT arriving during a (slow) plugin import is the user's Ctrl-C: exit 130."""
    make_distribution(
        tmp_path,
        "paca-slow",
        {"slow": "slow_plugin"},
        {
            "slow_plugin": "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n"
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "paca", "backends"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr and "Traceback" not in run.stderr


# ------------------------------------------------------------------- small, each seen
def test_blocking_the_default_backend_says_so(monkeypatch):
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "cpu")
    with pytest.raises(paca.BackendUnavailableError) as err:
        paca.get_backend()
    text = str(err.value)
    assert "default backend 'cpu' is blocked by PACA_BLOCKED_BACKENDS=cpu" in text
    assert "backend installed" not in text and "PACA_BACKEND=<name>" in text


def test_block_backend_of_the_default_names_the_call():
    paca.block_backend("cpu")
    with pytest.raises(
        paca.BackendUnavailableError, match=r"blocked by paca.block_backend\('cpu'\)"
    ):
        paca.get_backend()


def test_blocking_the_default_lists_backends_usable_by_name(plugin_path, monkeypatch):
    install(
        plugin_path,
        "paca-named",
        "class N(CPUBackend):\n    name = 'named'\n    priority = None\n",
        {"named": "N"},
    )
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "paca")  # every built-in
    with pytest.raises(paca.BackendUnavailableError, match="only when asked for by name: named"):
        paca.get_backend()


@pytest.mark.parametrize("bad", [123, 4.5, ["cpu"], b"cpu", object()])
def test_use_backend_takes_a_name_or_a_backend(bad):
    with pytest.raises(TypeError, match="by name .* or as a paca.backend_abc.Backend instance"):
        paca.use_backend(bad)
    with pytest.raises(TypeError, match="by name"), paca.backend(bad):
        pass


def test_use_backend_with_a_class_or_an_instance():
    from paca_cpu import CPUBackend

    with pytest.raises(TypeError, match="pass its name 'cpu' or an instance"):
        paca.use_backend(CPUBackend)
    mine = CPUBackend()
    assert paca.use_backend(mine) is mine and paca.get_backend() is mine
    with paca.backend(mine) as b:
        assert b is mine

    class Impostor(CPUBackend):
        name = "cpu"

    with pytest.raises(ValueError, match="give your class another name"):
        paca.use_backend(Impostor())


def test_use_backend_with_an_instance_of_an_unregistered_backend():
    from paca_cpu import CPUBackend

    class Scratch(CPUBackend):
        name = "scratch"

    assert paca.use_backend(Scratch()).name == "scratch"
    assert "scratch" in {i.name for i in paca.list_backends()}
    assert registry().resolve("scratch") is paca.get_backend()


# ------------------------------------------------------------------------- API versions
@pytest.mark.parametrize(
    ("declared", "ok"),
    [(2, True), ((2, 0), True), ((2, 1), False), ((1, 0), False), (1, False), ((3, 0), False),
     ("2.0", False), ((2,), False), (True, False), (None, False)],
)  # fmt: skip
def test_api_version_int_or_major_minor(monkeypatch, declared, ok):
    monkeypatch.setattr("paca._registry.BACKEND_API_VERSION", (2, 0))
    assert (api_incompatibility(declared, "paca-x") is None) is ok


def test_older_minor_loads_newer_minor_and_other_major_are_refused(plugin_path, monkeypatch):
    monkeypatch.setattr("paca._registry.BACKEND_API_VERSION", (2, 3))
    install(
        plugin_path,
        "paca-versions",
        """
        class Old(CPUBackend):
            name = "old-minor"
            api_version = (2, 1)
        class IntTwo(CPUBackend):
            name = "int-two"
            api_version = 2
        class New(CPUBackend):
            name = "new-minor"
            api_version = (2, 4)
        class V1(CPUBackend):
            name = "v1"
            api_version = 1
        class V3(CPUBackend):
            name = "v3"
            api_version = (3, 0)
        """,
        {"old-minor": "Old", "int-two": "IntTwo", "new-minor": "New", "v1": "V1", "v3": "V3"},
    )
    with pytest.warns(PluginLoadWarning) as caught:
        rows = infos()
    assert rows["old-minor"].available and rows["old-minor"].api_version == (2, 1)
    assert rows["int-two"].available and rows["int-two"].api_version == (2, 0)
    assert paca.use_backend("old-minor").name == "old-minor"
    text = " ".join(str(w.message) for w in caught)
    assert "paca-versions" in text
    assert "v2.4, newer than this paca's v2.3" in rows["new-minor"].reason
    assert "upgrade paca" in rows["new-minor"].reason
    assert "v1.0, but this paca speaks v2.3" in rows["v1"].reason
    assert "install a version of paca-versions made for API v2" in rows["v1"].reason
    assert "v3.0, newer than this paca's v2.3" in rows["v3"].reason
    for name in ("new-minor", "v1", "v3"):
        assert not rows[name].available
        with pytest.raises(paca.BackendUnavailableError, match="paca-versions"):
            paca.use_backend(name)


def test_builtin_backends_report_their_api_version():
    assert infos()["cpu"].api_version == (2, 0) or infos()["cpu"].api_version is not None


# ---------------------------------------------------------------- entry-point names
def test_entry_point_named_unlike_its_backend_warns_and_is_shown(plugin_path, capsys):
    make_distribution(
        plugin_path,
        "paca-misnamed",
        {"misnamed-ep": "misnamed_plugin"},
        {
            "misnamed_plugin": """
                from paca.hookspecs import hookimpl
                from paca_cpu import CPUBackend
                class M(CPUBackend):
                    name = "misnamed"
                @hookimpl
                def paca_backends():
                    return [M]
            """
        },
    )
    with pytest.warns(EntryPointNameWarning, match="under the entry point 'misnamed-ep'"):
        row = infos()["misnamed"]
    assert row.entry_point == "misnamed-ep" and not row.entry_point_matches
    assert infos()["cpu"].entry_point_matches
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert (
        "entry point: backend 'misnamed' from paca-misnamed 1.2.3 is provided under the entry point 'misnamed-ep'"
        in out
    )
