"""Plugin robustness: broken, duplicate, blocked and incompatible plugins are reported by
their distribution and never break discovery or use of the other backends."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import TOY_PLUGIN, make_distribution

import paca
from paca._registry import PluginLoadWarning, UnknownBackendError, registry

TOY = TOY_PLUGIN  # one toy plugin for every registry test

BROKEN_MODULES = {
    "import_error": "raise ImportError('vendor SDK missing')\n",
    "exits": "import sys\nsys.exit('plugin called sys.exit')\n",
    "hook_raises": """
        from paca.hookspecs import hookimpl
        @hookimpl
        def paca_backends():
            raise RuntimeError('boom')
    """,
    "not_a_list": """
        from paca.hookspecs import hookimpl
        from paca_cpu import CPUBackend
        class One(CPUBackend):
            name = 'one'
        @hookimpl
        def paca_backends():
            return One
    """,
    "no_hookimpl": """
        def paca_backends():  # forgot @hookimpl
            return []
    """,
    "abstract": """
        from paca.hookspecs import hookimpl
        from paca.backend_abc import Backend
        class Half(Backend):
            name = 'half'
            device_type = 'cpu'
            @classmethod
            def is_available(cls):
                return True
        @hookimpl
        def paca_backends():
            return [Half]
    """,
    "flaky": """
        from paca.hookspecs import hookimpl
        from paca_cpu import CPUBackend
        class Flaky(CPUBackend):
            name = 'flaky'
            priority = 1000  # would win auto-detection if it did not raise
            @classmethod
            def is_available(cls):
                raise OSError('driver crashed')
        @hookimpl
        def paca_backends():
            return [Flaky]
    """,
}


def install_toy(root: Path, dist: str = "paca-toy", module: str = "toy_plugin") -> None:
    make_distribution(root, dist, {"toy": module}, {module: TOY})


def install_broken(root: Path) -> None:
    make_distribution(
        root,
        "paca-broken",
        {name: f"broken_{name}" for name in BROKEN_MODULES},
        {f"broken_{name}": src for name, src in BROKEN_MODULES.items()},
    )


def _tiny_forward(backend: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    wrapped = paca.wrap(model, paca.PacaConfig(r=2, target_modules=["0"]), backend=backend)
    return wrapped(torch.randn(3, 8))


def test_broken_plugins_leave_the_others_listed_and_usable(plugin_path):
    install_toy(plugin_path)
    install_broken(plugin_path)
    with pytest.warns(PluginLoadWarning) as caught:
        infos = {i.name: i for i in paca.list_backends()}
    assert {"cpu", "toy", "toy-off", "flaky"} <= set(infos)
    assert "one" not in infos and "half" not in infos or not infos["half"].available
    # every broken plugin is reported with its distribution and what went wrong
    errors = {r.name: r for r in registry().plugin_errors()}
    assert set(errors) == {"import_error", "exits", "hook_raises", "not_a_list", "no_hookimpl"}
    assert all(r.distribution == "paca-broken" and r.version == "1.2.3" for r in errors.values())
    assert "ImportError: vendor SDK missing" in errors["import_error"].error
    assert "SystemExit: plugin called sys.exit" in errors["exits"].error
    assert "RuntimeError: boom" in errors["hook_raises"].error
    assert "return a list of Backend classes" in errors["not_a_list"].error
    assert "defines no paca_backends() hook" in errors["no_hookimpl"].error
    text = " ".join(str(w.message) for w in caught)
    assert "paca-broken" in text and "PACA_BLOCKED_BACKENDS" in text
    # and the good backends still work end to end
    assert torch.equal(_tiny_forward("toy"), _tiny_forward("cpu"))
    assert paca.use_backend("toy").name == "toy"


def test_incomplete_backend_class_is_rejected_with_the_missing_methods(plugin_path):
    install_broken(plugin_path)
    with pytest.warns(PluginLoadWarning) as caught:
        half = {i.name: i for i in paca.list_backends()}["half"]
    assert any("does not implement the Backend methods" in str(w.message) for w in caught)
    assert not half.available and half.distribution == "paca-broken"
    assert "delta_grad" in half.reason and "gather" in half.reason  # abstract primitives
    with pytest.raises(paca.BackendUnavailableError, match="does not implement"):
        paca.use_backend("half")


def test_raising_is_available_is_reported_and_never_auto_selected(plugin_path):
    install_broken(plugin_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        flaky = {i.name: i for i in paca.list_backends()}["flaky"]
        assert paca.get_backend().name != "flaky"
    assert not flaky.available and flaky.distribution == "paca-broken"
    assert flaky.reason.startswith("is_available() raised OSError: driver crashed")
    assert "a bug in paca-broken 1.2.3" in flaky.reason
    assert "PACA_BLOCKED_BACKENDS=flaky" in flaky.reason


def test_duplicate_names_between_plugins_name_both_providers(plugin_path):
    install_toy(plugin_path, "paca-toy")
    install_toy(plugin_path, "paca-toy-fork", "toy_fork_plugin")
    with pytest.warns(PluginLoadWarning, match="provided twice") as caught:
        toy = {i.name: i for i in paca.list_backends()}["toy"]
    message = " ".join(str(w.message) for w in caught)
    assert "paca-toy 1.2.3" in message and "paca-toy-fork 1.2.3" in message
    assert len(toy.duplicates) == 1
    both = {toy.distribution, toy.duplicates[0].split("distribution ")[1].split()[0]}
    assert both == {"paca-toy", "paca-toy-fork"}
    assert paca.use_backend("toy").name == "toy"


def test_two_entry_points_may_share_one_module(plugin_path):
    make_distribution(
        plugin_path, "paca-toy", {"toy": "toy_plugin", "toy-off": "toy_plugin"}, {"toy_plugin": TOY}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already registered" failure, no duplicate warning
        names = {i.name for i in paca.list_backends()}
    assert {"toy", "toy-off"} <= names and not registry().plugin_errors()


def test_block_list_by_backend_plugin_or_distribution_name(plugin_path, monkeypatch):
    install_toy(plugin_path)
    install_broken(plugin_path)
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "paca-broken, toy-off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # blocked plugins are not imported, so nothing warns
        names = {i.name for i in paca.list_backends()}
        assert not registry().plugin_errors()
    assert "toy" in names and "toy-off" not in names and "flaky" not in names
    blocked = registry().blocked()
    assert any("paca-broken" in b for b in blocked) and "backend 'toy-off' from paca-toy" in blocked
    with pytest.raises(UnknownBackendError, match="'toy-off' is on the block list"):
        paca.use_backend("toy-off")
    paca.block_backend("toy")
    with pytest.raises(UnknownBackendError, match="block list"):
        paca.use_backend("toy")


def test_disable_autoload_keeps_only_builtins(plugin_path, monkeypatch):
    install_toy(plugin_path)
    install_broken(plugin_path)
    monkeypatch.setenv("PACA_DISABLE_PLUGIN_AUTOLOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infos = paca.list_backends()
    assert {i.distribution for i in infos} == {"paca"}
    assert "cpu" in {i.name for i in infos} and registry().autoload_disabled()
    with pytest.raises(UnknownBackendError, match="PACA_DISABLE_PLUGIN_AUTOLOAD is set"):
        paca.use_backend("toy")


def test_plugin_backend_passes_the_conformance_suite_by_name(plugin_path):
    from paca.testing import check_backend

    install_toy(plugin_path)
    report = check_backend("toy", items=["api", "availability", "registration", "shapes[float32]"])
    assert report.ok, str(report)
    assert report["registration"].status == "passed"
    unavailable = check_backend("toy-off", items=["availability", "shapes[float32]"])
    assert unavailable["availability"].status == "passed"
    assert unavailable["shapes[float32]"].status == "skipped"
    assert "no toy device attached" in unavailable["shapes[float32]"].message
