"""The architecture contracts (docs/architecture.md) hold: the core stands alone, backends
use only the backend interface, no cycles, no private names across modules, and the public
API is exactly ``paca.__all__`` in ``dir(paca)`` and in the docs."""

from __future__ import annotations

import ast
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import paca

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a paca dependency there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACA = ROOT / "paca"
BACKENDS = ROOT / "backends"
PLUGIN = ROOT / "plugins" / "paca-example-backend" / "src"
#: what built-in backends may import from paca (docs/architecture.md, contract 2)
BACKEND_INTERFACE = {"paca.backend_abc", "paca.hookspecs", "paca.environment"}


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def paca_modules() -> set[str]:
    """``paca.<name>`` for every module and package directly inside paca."""
    return {f"paca.{m.name}" for m in pkgutil.iter_modules([str(PACA)])}


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or shutil.which(
        "lint-imports", path=str(Path(sys.executable).parent)
    )
    assert exe, "import-linter is not installed: pip install -e '.[test]'"
    run = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )  # --no-cache: a cache written under other settings can hide an import
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_every_paca_module_is_core_or_harness():
    core = contracts()["core"]
    sources, harness = set(core["source_modules"]), set(core["forbidden_modules"])
    assert not sources & harness
    unclassified = sorted(paca_modules() - sources - harness)
    assert not unclassified, (
        f"{unclassified} are neither core nor harness: add each to source_modules (core: "
        f"it must not import the harness) or forbidden_modules (harness) of the 'core' "
        f"contract in pyproject.toml, and to the module map in docs/architecture.md"
    )
    gone = sorted((sources | harness) - paca_modules())
    assert not gone, f"the 'core' contract names modules that do not exist: {gone}"


def test_backends_may_import_only_the_backend_interface():
    forbidden = set(contracts()["backends"]["forbidden_modules"])
    assert not forbidden & BACKEND_INTERFACE
    missing = sorted(paca_modules() - BACKEND_INTERFACE - forbidden)
    assert not missing, (
        f"{missing} are not forbidden to the built-in backends: add them to forbidden_modules "
        f"of the 'backends' contract in pyproject.toml (or, if one is now part of the backend "
        f"interface, to BACKEND_INTERFACE here and to docs/architecture.md)"
    )


def test_lazy_public_names_come_from_the_core():
    core = set(contracts()["core"]["source_modules"])
    outside = {n: m for n, m in paca._LAZY.items() if ".".join(m.split(".")[:2]) not in core}
    assert not outside, f"public names defined outside the core: {outside}"


def _is_module(package: str, name: str) -> bool:
    base = ROOT / Path(*package.split("."))
    if package.startswith("paca_"):
        base = next(p for p in (BACKENDS, PLUGIN) if (p / package.split(".")[0]).is_dir())
        base = base / Path(*package.split("."))
    return (base / f"{name}.py").is_file() or (base / name / "__init__.py").is_file()


def _private_imports(path: Path, module: str) -> list[str]:
    """``from paca... import _name`` of a private name (not a sibling private module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if node.module.split(".")[0] != "paca":
            continue
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__"):
                continue
            inside = module == node.module or module.startswith(node.module + ".")
            if _is_module(node.module, name) and inside:
                continue  # a package's private module, used inside that package
            found.append(f"{module} (line {node.lineno}): from {node.module} import {name}")
    return found


def _python_files(top: Path, package: str) -> list[tuple[Path, str]]:
    """``(file, dotted module name)`` of every module of the package in folder ``top``."""
    out = []
    for path in sorted(top.rglob("*.py")):
        parts = [package, *path.relative_to(top).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out.append((path, ".".join(parts)))
    return out


def test_no_private_names_imported_across_modules():
    core = contracts()["core"]["source_modules"]
    files: list[tuple[Path, str]] = []
    for name in core:
        stem = PACA / name.split(".", 1)[1]
        if stem.is_dir():
            files += _python_files(stem, name)
        else:
            files.append((stem.with_suffix(".py"), name))
    for top in (*sorted(BACKENDS.glob("paca_*")), *sorted(PLUGIN.glob("paca_*"))):
        files += _python_files(top, top.name)
    found = [hit for path, module in files for hit in _private_imports(path, module)]
    assert not found, (
        "private names imported from another module (make the name public, or keep it "
        "where it is used):\n  " + "\n  ".join(found)
    )


def test_dir_shows_exactly_all():
    assert dir(paca) == sorted(paca.__all__)
    assert len(set(paca.__all__)) == len(paca.__all__)
    for name in paca.__all__:
        assert getattr(paca, name) is not None, name


def test_docs_api_list_is_exactly_all():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    match = re.search(r"^## Public API\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "docs/architecture.md has no '## Public API' section"
    listed = re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", match.group(1), re.M)
    assert sorted(listed) == sorted(paca.__all__), (
        f"docs/architecture.md's API list and paca.__all__ differ: only in the docs "
        f"{sorted(set(listed) - set(paca.__all__))}, only in __all__ "
        f"{sorted(set(paca.__all__) - set(listed))}"
    )
    assert len(listed) == len(set(listed)), "a name is listed twice"


@pytest.mark.parametrize("flag", ["1", "true", "YES", " on "])
def test_env_flag_reads_true_values(monkeypatch, flag):
    from paca.environment import env_flag

    monkeypatch.setenv("PACA_TEST_FLAG", flag)
    assert env_flag("PACA_TEST_FLAG")


@pytest.mark.parametrize("flag", ["", "0", "false", "no", "off", "2"])
def test_env_flag_reads_anything_else_as_false(monkeypatch, flag):
    from paca.environment import env_flag

    monkeypatch.setenv("PACA_TEST_FLAG", flag)
    assert not env_flag("PACA_TEST_FLAG")
    monkeypatch.delenv("PACA_TEST_FLAG")
    assert not env_flag("PACA_TEST_FLAG")
