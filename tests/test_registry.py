"""Backend discovery through entry points: lazy, robust, with errors that name names."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from helpers import TOY_PLUGIN, make_distribution

import paca
from paca._registry import PluginLoadWarning, UnknownBackendError, registry

GOOD_PLUGIN = TOY_PLUGIN


def test_builtin_cpu_is_discovered_and_auto_selected():
    infos = {i.name: i for i in paca.list_backends()}
    assert infos["cpu"].available and infos["cpu"].distribution == "paca"
    assert paca.get_backend().name == "cpu"


def test_fake_distribution_registers_backends(plugin_path):
    make_distribution(plugin_path, "paca-toy", {"toy": "toy_plugin"}, {"toy_plugin": GOOD_PLUGIN})
    backend = paca.use_backend("toy")
    assert backend.name == "toy"
    assert paca.get_backend() is backend
    infos = {i.name: i for i in paca.list_backends()}
    assert infos["toy"].distribution == "paca-toy" and infos["toy"].version == "1.2.3"
    assert not infos["toy-off"].available and infos["toy-off"].reason == "no toy device attached"
    paca.use_backend(None)
    assert paca.get_backend().name == "cpu"  # unavailable toy-off is never auto-selected


def test_broken_plugins_are_named_and_others_keep_working(plugin_path):
    make_distribution(plugin_path, "paca-toy", {"toy": "toy_plugin"}, {"toy_plugin": GOOD_PLUGIN})
    make_distribution(
        plugin_path,
        "paca-broken",
        {"broken": "broken_plugin", "raiser": "raiser_plugin"},
        {
            "broken_plugin": "raise ImportError('vendor SDK missing')\n",
            "raiser_plugin": (
                "from paca.hookspecs import hookimpl\n"
                "@hookimpl\ndef paca_backends():\n    raise RuntimeError('boom')\n"
            ),
        },
    )
    with pytest.warns(PluginLoadWarning) as record:
        names = {i.name for i in paca.list_backends()}
    messages = " ".join(str(w.message) for w in record)
    assert "paca-broken" in messages and "vendor SDK missing" in messages and "boom" in messages
    assert {"cpu", "toy", "toy-off"} <= names
    assert paca.use_backend("toy").name == "toy"
    errors = {r.name: r.error for r in registry().plugin_errors()}
    assert set(errors) == {"broken", "raiser"}


def test_unknown_backend_lists_available_and_unavailable(plugin_path):
    make_distribution(plugin_path, "paca-toy", {"toy": "toy_plugin"}, {"toy_plugin": GOOD_PLUGIN})
    with pytest.raises(UnknownBackendError) as err:
        paca.use_backend("tpu")
    text = str(err.value)
    assert "unknown paca backend 'tpu'" in text
    assert "Available: cpu, toy" in text
    assert "toy-off (no toy device attached)" in text


def test_unavailable_backend_says_why(plugin_path):
    make_distribution(plugin_path, "paca-toy", {"toy": "toy_plugin"}, {"toy_plugin": GOOD_PLUGIN})
    with pytest.raises(paca.BackendUnavailableError, match="no toy device attached"):
        paca.use_backend("toy-off")


def test_lazy_loading_only_imports_the_requested_plugin(plugin_path):
    make_distribution(  # one entry point per backend, named like it: no name warning
        plugin_path,
        "paca-toy",
        {"toy": "toy_plugin", "toy-off": "toy_plugin"},
        {"toy_plugin": GOOD_PLUGIN},
    )
    make_distribution(
        plugin_path, "paca-other", {"other": "other_plugin"}, {"other_plugin": "raise SystemError"}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading 'other' would warn
        paca.use_backend("toy")
    assert "other_plugin" not in sys.modules


def test_env_var_context_and_explicit_precedence(monkeypatch, plugin_path):
    make_distribution(plugin_path, "paca-toy", {"toy": "toy_plugin"}, {"toy_plugin": GOOD_PLUGIN})
    monkeypatch.setenv("PACA_BACKEND", "toy")
    assert paca.get_backend().name == "toy"
    assert registry().selection()[1].startswith("environment")
    with paca.backend("cpu") as b:
        assert b.name == "cpu" and paca.get_backend().name == "cpu"
    assert paca.get_backend().name == "toy"
    paca.use_backend("cpu")
    assert paca.get_backend().name == "cpu"


def test_api_version_mismatch_and_duplicates_are_reported(plugin_path):
    make_distribution(
        plugin_path,
        "paca-future",
        {"future": "future_plugin"},
        {
            "future_plugin": (
                "from paca.hookspecs import hookimpl\nfrom paca_cpu import CPUBackend\n"
                "class Future(CPUBackend):\n    name = 'future'\n    api_version = 99\n"
                "class Shadow(CPUBackend):\n    name = 'cpu'\n"
                "@hookimpl\ndef paca_backends():\n    return [Future, Shadow]\n"
            )
        },
    )
    with pytest.warns(PluginLoadWarning) as record:
        infos = {i.name: i for i in paca.list_backends()}
    text = " ".join(str(w.message) for w in record)
    assert "API v99" in text and "provided twice" in text and "paca-future" in text
    assert not infos["future"].available and "v99" in infos["future"].reason
    assert infos["cpu"].distribution == "paca"  # the built-in keeps its name
    assert infos["cpu"].duplicates


def test_disable_autoload_and_block_list(monkeypatch, plugin_path):
    make_distribution(plugin_path, "paca-toy", {"toy": "toy_plugin"}, {"toy_plugin": GOOD_PLUGIN})
    monkeypatch.setenv("PACA_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = {i.name for i in paca.list_backends()}
    assert "cpu" in names and not names & {"toy", "toy-off"}  # built-ins only
    monkeypatch.delenv("PACA_DISABLE_PLUGIN_AUTOLOAD")
    from paca._registry import reset_registry

    reset_registry()
    monkeypatch.setenv("PACA_BLOCKED_BACKENDS", "toy")
    with pytest.raises(UnknownBackendError):
        paca.use_backend("toy")


def test_import_paca_imports_no_backend_or_vendor_module():
    code = (
        "import sys, paca\n"
        "bad = [m for m in sys.modules if m.startswith(('paca_', 'habana', 'triton', 'torch'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
