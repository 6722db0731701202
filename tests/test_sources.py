"""Real data shipped by installed packages: scikit-learn's digits, Python's docs and source."""

from __future__ import annotations

import builtins
import importlib.util

import pytest
import torch

from paca.experiment import sources
from paca.experiment.data import load_splits
from paca.experiment.schema import DataSection, ExperimentError

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)


@needs_sklearn
def test_digits_split_by_class_relabelled_and_disjoint():
    rows = {s: sources.load_source("paca.data/digits:5-9", s)[0] for s in sources.SPLITS}
    assert sources.load_source("paca.data/digits:5-9", "train")[1] == 5
    sizes = {s: len(r) for s, r in rows.items()}
    assert sum(sizes.values()) == 896  # the images of classes 5-9 among the 1,797 digits
    assert abs(sizes["test"] - 0.2 * 896) < 5 and abs(sizes["val"] - 0.2 * 896) < 5
    for split_rows in rows.values():
        labels = {r["label"] for r in split_rows}
        assert labels == set(range(5))  # 5..9 renumbered 0..4, every class in every split
        image = split_rows[0]["image"]
        assert image.shape == (1, 8, 8) and image.dtype == torch.float32
        assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    keys = {s: {r["image"].numpy().tobytes() for r in rows[s]} for s in sources.SPLITS}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]
    again = sources.load_source("paca.data/digits:5-9", "test")[0]
    assert [r["label"] for r in again] == [r["label"] for r in rows["test"]]  # fixed split


@needs_sklearn
def test_digits_class_lists_and_bad_specs():
    assert sources.parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert sources.parse_classes("7,1,3") == [7, 1, 3]
    rows, n = sources.load_source("paca.data/digits:7,1", "val")
    assert n == 2 and {r["label"] for r in rows} == {0, 1}
    assert sources.load_source("paca.data/digits", "val")[1] == 10
    with pytest.raises(sources.UnknownSourceError, match="expected digits 0-9"):
        sources.load_source("paca.data/digits:a-z", "train")
    with pytest.raises(sources.UnknownSourceError, match="runs backwards"):
        sources.parse_classes("9-5")


def test_text_sources_split_by_document():
    for name, docs in (
        (sources.PYTHON_DOCS, sources.python_docs_documents()),
        (sources.PYTHON_CODE, sources.python_code_documents()),
    ):
        parts = {s: set(sources.document_split(docs, s)) for s in sources.SPLITS}
        assert set().union(*parts.values()) == set(docs)
        assert not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
        chars = {s: sum(len(docs[d]) for d in parts[s]) for s in sources.SPLITS}
        total = sum(chars.values())
        assert 0.15 < chars["test"] / total < 0.4 and 0.15 < chars["val"] / total < 0.4
        rows, labels = sources.load_source(name, "test", seq_len=64)
        assert labels == 0 and all(len(r["text"]) <= 63 for r in rows)
        assert {r["document"] for r in rows} <= parts["test"]
    assert len(sources.python_docs_documents()) > 50  # pydoc_data's help topics


def test_load_splits_uses_the_fixed_splits():
    section = DataSection(train="paca.data/python-docs", seq_len=32, max_eval_samples=10)
    splits = load_splits(section, seed=0)
    assert len(splits.eval) == 10 and splits.num_labels == 0
    test_docs = set(sources.document_split(sources.python_docs_documents(), "test"))
    assert {r["document"] for r in splits.eval} <= test_docs
    assert {r["document"] for r in splits.train}.isdisjoint(test_docs)
    val = load_splits(DataSection(train="paca.data/python-docs", seq_len=32, eval_split="val"), 1)
    val_docs = set(sources.document_split(sources.python_docs_documents(), "val"))
    assert {r["document"] for r in val.eval} <= val_docs
    other = load_splits(
        DataSection(train="paca.data/python-docs", eval="paca.data/python-code", seq_len=32), 0
    )
    assert other.eval[0]["document"].endswith(".py")  # held-out code: forgetting


def test_unknown_names_and_splits_say_what_exists():
    with pytest.raises(ExperimentError, match=r"paca.data/python-docs.*paca.data/python-code"):
        load_splits(DataSection(train="paca.data/wikipedia"), seed=0)
    with pytest.raises(ExperimentError, match="splits train, val, test"):
        load_splits(DataSection(train="paca.data/python-docs", train_split="validation"), 0)


def _hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_missing_package_says_which_package_provides_the_data(monkeypatch: pytest.MonkeyPatch):
    sources._digits_arrays.cache_clear()
    sources.python_docs_documents.cache_clear()
    _hide(monkeypatch, "sklearn")
    _hide(monkeypatch, "pydoc_data")
    try:
        with pytest.raises(sources.SourceNotAvailableError, match="scikit-learn.*pip install"):
            load_splits(DataSection(train="paca.data/digits:5-9"), seed=0)
        with pytest.raises(sources.SourceNotAvailableError, match="pydoc_data"):
            load_splits(DataSection(train="paca.data/python-docs"), seed=0)
    finally:
        monkeypatch.undo()
        sources._digits_arrays.cache_clear()
        sources.python_docs_documents.cache_clear()
    assert issubclass(sources.SourceNotAvailableError, RuntimeError)  # `paca run`: exit 1


def test_missing_stdlib_sources(monkeypatch: pytest.MonkeyPatch, tmp_path):
    sources.python_code_documents.cache_clear()
    monkeypatch.setattr(sources, "stdlib_folder", lambda: tmp_path)
    try:
        with pytest.raises(sources.SourceNotAvailableError, match="has no"):
            sources.load_source("paca.data/python-code", "train")
    finally:
        monkeypatch.undo()
        sources.python_code_documents.cache_clear()


def test_cli_reports_a_missing_package_as_bad_input(monkeypatch, tmp_path, capsys):
    from paca.cli.main import main

    sources._digits_arrays.cache_clear()
    _hide(monkeypatch, "sklearn")
    try:
        path = "digits-vit-paca"
        code = main(["run", path, "--backend", "cpu", "--run-dir", str(tmp_path / "r")])
    finally:
        monkeypatch.undo()
        sources._digits_arrays.cache_clear()
    assert code == 1
    assert "provided by scikit-learn" in capsys.readouterr().err
