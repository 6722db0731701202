"""docs/writing-a-backend.md stays complete and true: every hookspec, public Backend
member and contract item is documented, and the walk-through's plugin really works."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

from paca import hookspecs
from paca.backend_abc import Backend
from paca.testing import CONTRACT, check_backend

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a paca dependency there)
    import tomli as tomllib

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-backend.md"


def section(title: str) -> str:
    """The text of the level-2 section ``title`` (up to the next level-2 heading)."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/writing-a-backend.md has no '## {title}' section"
    return match.group(1)


def headed_names(text: str, level: str) -> set[str]:
    """Names in headings like ``#### `name(args)` `` at ``level`` (e.g. "####")."""
    return set(re.findall(rf"^{level} `([A-Za-z_][A-Za-z0-9_]*)", text, re.M))


def public_backend_members() -> set[str]:
    names = set(vars(Backend)) | set(Backend.__annotations__)
    return {n for n in names if not n.startswith("_")}


def hookspec_names() -> set[str]:
    spec_attr = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, spec_attr)
    }


def test_every_hookspec_is_documented():
    specs = hookspec_names()
    assert specs, "found no hookspecs to check"
    missing = specs - headed_names(section("Hookspec reference"), "###")
    assert not missing, (
        f"hookspecs {sorted(missing)} are not documented: add a '### `name(...)`' heading under "
        f"'## Hookspec reference' in {DOC.name}"
    )


def test_every_public_backend_member_is_documented_and_nothing_stale():
    documented = headed_names(section("Backend reference"), "####")
    members = public_backend_members()
    missing = members - documented
    assert not missing, (
        f"Backend members {sorted(missing)} are not documented: add a '#### `name`' heading "
        f"under '## Backend reference' in {DOC.name}"
    )
    stale = documented - members
    assert not stale, f"{DOC.name} documents {sorted(stale)}, which Backend no longer has"


def test_every_contract_item_is_in_the_table():
    table = section("Contract items")
    families = {item.split("[")[0] for item in CONTRACT}
    missing = {f for f in families if f"`{f}" not in table}
    assert not missing, f"contract items {sorted(missing)} are missing from the table"


def test_reference_headings_follow_the_real_signatures():
    text = section("Backend reference")
    for name in public_backend_members():
        member = inspect.getattr_static(Backend, name, None)
        fn = getattr(member, "__func__", member)
        if not callable(fn):
            continue
        params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        heading = re.search(rf"^#### `{name}\((.*?)\)`", text, re.M)
        assert heading, f"'#### `{name}(...)`' should show the parameters {params}"
        shown = [p.split("=")[0].strip() for p in heading.group(1).split(",") if p.strip()]
        assert shown == params, f"{name}: documented ({shown}) but the signature has {params}"


def walkthrough_files() -> dict[str, str]:
    """Code blocks whose first line is ``# file: <path>``, by path."""
    blocks = re.findall(
        r"^```(?:python|toml)\n# file: (\S+)\n(.*?)^```", DOC.read_text(), re.M | re.S
    )
    return dict(blocks)


def test_the_walkthrough_plugin_installs_and_passes_the_suite(tmp_path, monkeypatch):
    files = walkthrough_files()
    assert {"pyproject.toml", "src/paca_mydev/plugin.py", "tests/test_conformance.py"} <= set(files)
    root = tmp_path / "paca-mydev"
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    compile(files["tests/test_conformance.py"], "test_conformance.py", "exec")
    # "pip install -e ." as far as paca can tell: metadata with the entry points, src on path.
    project = tomllib.loads(files["pyproject.toml"])["project"]
    info = tmp_path / "site" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    eps = project["entry-points"]["paca.backends"]
    (info / "entry_points.txt").write_text(
        "[paca.backends]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(root / "src"))
    monkeypatch.delitem(sys.modules, "paca_mydev", raising=False)

    report = check_backend("mydev", run_compile=False)
    assert report.ok, str(report)
    assert report["registration"].status == "passed"
    assert report["dtype[bfloat16]"].status == "passed"
    assert report["shapes[float16]"].status == "skipped"  # not declared by the example
    info_row = {i.name: i for i in __import__("paca").list_backends()}["mydev"]
    assert info_row.distribution == "paca-mydev" and info_row.version == "0.1.0"


@pytest.mark.parametrize("name", ["PACA_BLOCKED_BACKENDS", "PACA_DISABLE_PLUGIN_AUTOLOAD"])
def test_environment_switches_are_documented(name):
    assert name in DOC.read_text()
