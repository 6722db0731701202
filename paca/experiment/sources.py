"""Real data that installed packages ship, so experiments need no downloads.

``[data].train`` (and ``[data].eval``) may name one of these:

``paca.data/digits:CLASSES``
    scikit-learn's 1,797 real 8x8 handwritten digits (``sklearn.datasets.load_digits``),
    restricted to ``CLASSES`` (``0-4``, ``5-9``, ``0-9``, ``1,3,7``; plain
    ``paca.data/digits`` is all ten). Labels are renumbered ``0..k-1`` in the order of
    ``CLASSES``, so ``digits:5-9`` is a five-class task (5 -> 0, ..., 9 -> 4) that a
    model pretrained on ``digits:0-4`` meets with a new head. Rows are
    ``{"image": (1, 8, 8) float tensor in [-1, 1], "label": int}``.
``paca.data/python-docs``
    English documentation text: the 79 topics of Python's own ``pydoc_data.topics``
    (the text ``help("if")`` prints), cut into ``seq_len``-byte chunks.
``paca.data/python-code``
    Code text: the standard library's own top-level ``.py`` files, cut the same way.

Each source has fixed ``train`` / ``val`` / ``test`` splits that never depend on the
experiment seed, so every seed and method is scored on the same held-out rows: digits
are split 60/20/20 within each class; text is split by *document* (whole topics or
files are held out), so held-out loss measures the domain, not memorised neighbours.
Rows of a split come in a fixed shuffled order, so ``max_train_samples`` takes a
random subset rather than the first documents.
"""

from __future__ import annotations

import random
import re
import sysconfig
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

PREFIX = "paca.data/"
DIGITS = PREFIX + "digits"
PYTHON_DOCS = PREFIX + "python-docs"
PYTHON_CODE = PREFIX + "python-code"
SPLITS = ("train", "val", "test")
#: Fractions of the held-out splits (the rest is train).
HELD_OUT = {"test": 0.2, "val": 0.2}
_SPLIT_SEED = 20240531  # fixed: the splits never depend on the experiment seed


class SourceNotAvailableError(ImportError, RuntimeError):
    """A shipped data source needs a package that is not installed.

    An ``ImportError`` (what is missing is a package) that is also a ``RuntimeError``, so
    ``paca run`` reports it as bad input (exit 1, the message) rather than a traceback.
    """


class UnknownSourceError(ValueError):
    """A ``paca.data/...`` name that is not one of the shipped sources."""


def is_real_source(name: str) -> bool:
    return name.startswith(PREFIX)


def source_names() -> list[str]:
    """The names an experiment file may use (digits with an example class list)."""
    return [f"{DIGITS}:0-4", f"{DIGITS}:5-9", DIGITS, PYTHON_DOCS, PYTHON_CODE]


# -------------------------------------------------------------------------- digits
def parse_classes(spec: str, where: str = "") -> list[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; ``"1,3,7"`` -> ``[1, 3, 7]``; ``"5-9,0"`` works too."""
    classes: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d)(?:-(\d))?", part)
        if not m:
            raise UnknownSourceError(
                f"{where}digit classes {spec!r}: expected digits 0-9 as ranges or lists, "
                f"e.g. 'digits:0-4', 'digits:5-9', 'digits:1,3,7'"
            )
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise UnknownSourceError(f"{where}digit class range {part!r} runs backwards")
        classes.extend(c for c in range(lo, hi + 1) if c not in classes)
    return classes


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Any, Any]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SourceNotAvailableError(
            f"data set {DIGITS!r} is provided by scikit-learn, which is not installed: "
            f"pip install scikit-learn (or pip install 'paca[data]')"
        ) from None
    bunch = load_digits()
    return bunch.images, bunch.target


def _stratified(labels: list[int], split: str) -> list[int]:
    """Indices of ``split``: within each class, a fixed shuffle cut 60/20/20."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    chosen: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        random.Random(_SPLIT_SEED + y).shuffle(idx)
        n_test = round(len(idx) * HELD_OUT["test"])
        n_val = round(len(idx) * HELD_OUT["val"])
        parts = {"test": idx[:n_test], "val": idx[n_test : n_test + n_val]}
        parts["train"] = idx[n_test + n_val :]
        chosen.extend(parts[split])
    random.Random(_SPLIT_SEED).shuffle(chosen)
    return chosen


def digits_rows(classes: list[int], split: str) -> list[dict[str, Any]]:
    """Rows ``{"image": (1, 8, 8) tensor in [-1, 1], "label": index in classes}``."""
    import torch

    images, targets = _digits_arrays()
    keep = [i for i, y in enumerate(targets) if int(y) in classes]
    labels = [classes.index(int(targets[i])) for i in keep]
    rows = []
    for j in _stratified(labels, split):
        pixels = torch.tensor(images[keep[j]], dtype=torch.float32)[None] / 8.0 - 1.0
        rows.append({"image": pixels, "label": labels[j]})
    return rows


# ---------------------------------------------------------------------------- text
@lru_cache(maxsize=1)
def python_docs_documents() -> dict[str, str]:
    """``{topic: text}`` from ``pydoc_data.topics`` (Python's own help texts)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise SourceNotAvailableError(
            f"data set {PYTHON_DOCS!r} is provided by Python's own 'pydoc_data' package, "
            f"which this Python lacks (some Linux distributions split it out: install the "
            f"full standard library, e.g. apt install libpython3-stdlib, or use python.org's "
            f"or conda's Python)"
        ) from None
    return {name: topics[name] for name in sorted(topics)}


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def python_code_documents() -> dict[str, str]:
    """``{file name: source}`` of the standard library's top-level ``.py`` files."""
    folder = stdlib_folder()
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not files:
        raise SourceNotAvailableError(
            f"data set {PYTHON_CODE!r} reads the standard library's .py files, but "
            f"{folder} has none (a Python installed without its source files, e.g. "
            f"only .pyc); install a Python that ships its library sources"
        )
    docs = {}
    for p in files:
        try:
            docs[p.name] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a broken or non-UTF-8 file is not text we want
    return docs


def document_split(docs: dict[str, str], split: str) -> list[str]:
    """Names of the documents in ``split``: a fixed hash order, cut by characters.

    Documents are taken in order of ``crc32(name)`` (a stable pseudo-random order that
    does not change when documents are added elsewhere) into ``test`` until it holds
    20% of the characters, then ``val`` (20%), then ``train``.
    """
    total = sum(len(t) for t in docs.values())
    order = sorted(docs, key=lambda n: (zlib.crc32(n.encode()), n))
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    filled = {"test": 0, "val": 0}
    for name in order:
        for s in ("test", "val"):
            if filled[s] < HELD_OUT[s] * total:
                out[s].append(name)
                filled[s] += len(docs[name])
                break
        else:
            out["train"].append(name)
    return sorted(out[split])


def chunk_text(text: str, size: int, min_size: int = 16) -> list[str]:
    """Non-overlapping ``size``-character chunks (a shorter last one if >= ``min_size``)."""
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    return [c for c in chunks if len(c) >= min(min_size, size)]


def text_rows(docs: dict[str, str], split: str, seq_len: int) -> list[dict[str, str]]:
    """Rows ``{"text": chunk, "document": name}`` with ``seq_len - 1`` characters per chunk.

    One position goes to the BOS token the tokenizer prepends; a chunk of ASCII text then
    fills exactly ``seq_len`` tokens of the byte tokenizer (the EOS falls off: the text
    continues in the next chunk).
    """
    size = max(seq_len - 1, 1)
    rows = [
        {"text": chunk, "document": name}
        for name in document_split(docs, split)
        for chunk in chunk_text(docs[name], size)
    ]
    random.Random(_SPLIT_SEED).shuffle(rows)
    return rows


# --------------------------------------------------------------------------- entry
_TEXT: dict[str, Callable[[], dict[str, str]]] = {
    PYTHON_DOCS: python_docs_documents,
    PYTHON_CODE: python_code_documents,
}


def load_source(name: str, split: str, seq_len: int = 64) -> tuple[list[dict[str, Any]], int]:
    """``(rows, num_labels)`` of the shipped source ``name``; ``num_labels`` is 0 for text."""
    if split not in SPLITS:
        raise UnknownSourceError(
            f"data set {name!r} has the splits {', '.join(SPLITS)}; got split {split!r} "
            f"(check [data].train_split / [data].eval_split)"
        )
    base, _, spec = name.partition(":")
    if base == DIGITS:
        classes = parse_classes(spec, f"data set {name!r}: ") if spec else list(range(10))
        return digits_rows(classes, split), len(classes)
    if base in _TEXT and not spec:
        return text_rows(_TEXT[base](), split, seq_len), 0
    raise UnknownSourceError(
        f"unknown data set {name!r}; the shipped data sets are {', '.join(source_names())} "
        f"(digits take any classes, e.g. '{DIGITS}:1,3,7')"
    )
