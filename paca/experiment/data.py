"""Load an experiment's examples and turn them into fixed-shape model inputs.

Sources: the built-in generated sets (``paca.tiny/instructions``, ``paca.tiny/images``),
real data shipped by installed packages (``paca.data/digits:5-9``, ``paca.data/python-docs``,
``paca.data/python-code``: see :mod:`paca.experiment.sources`), local JSONL/JSON/CSV
files, folders written by ``datasets``' ``save_to_disk``, and hub dataset ids (through
``datasets.load_dataset``). Rows stay as they are loaded and are
converted one at a time, so a large image set is never decoded all at once.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paca.experiment import sources
from paca.experiment.schema import DataSection, ExperimentError

BUILTIN_TEXT = "paca.tiny/instructions"
BUILTIN_IMAGES = "paca.tiny/images"
BUILTINS = (BUILTIN_TEXT, BUILTIN_IMAGES)
DEFAULT_BUILTIN_SIZES = (2000, 64)  # train, eval
_FILE_SUFFIXES = {".jsonl", ".json", ".csv"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset source is neither built in, nor a local file/folder, nor loadable."""


@dataclass
class Splits:
    """Raw rows of the train and (optional) eval split."""

    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]] | None
    num_labels: int = 0


# ------------------------------------------------------------------------- loading
def _builtin(name: str, n: int, seed: int, image_size: int, num_labels: int) -> list[dict]:
    from paca.tiny import image_dataset, instruction_dataset

    if name == BUILTIN_TEXT:
        return instruction_dataset(n, seed=seed)
    pixels, labels = image_dataset(
        n, image_size=image_size or 32, num_classes=num_labels or 10, seed=seed
    )
    return [{"image": p, "label": int(y)} for p, y in zip(pixels, labels, strict=True)]


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV, JSON-lines, JSON-list or LMFlow (``{"instances": [...]}``) file."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    text = path.read_text(encoding="utf-8")
    rows: Any = None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # not one JSON document: read it as JSON lines
        if isinstance(rows, dict):  # LMFlow layout: {"type": ..., "instances": [...]}
            if not isinstance(rows.get("instances"), list):
                raise ExperimentError(
                    f"{path}: a JSON object file needs an 'instances' list (LMFlow layout); "
                    f"otherwise give a list of rows or JSON lines"
                )
            rows = rows["instances"]
    if rows is None:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ExperimentError(f"{path}:{lineno}: not a JSON object: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ExperimentError(f"{path}: every row must be a JSON object")
    return rows


def _pick_split(obj: Any, split: str, where: str) -> Any:
    """A ``Dataset`` from a ``Dataset``/``DatasetDict`` (``split`` chooses in a dict)."""
    if isinstance(obj, dict):  # DatasetDict is a dict of splits
        if split not in obj:
            raise ExperimentError(
                f"{where} has no split {split!r}; splits: {', '.join(sorted(obj.keys()))}"
            )
        return obj[split]
    return obj


def _datasets_module(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{what} needs the 'datasets' library: pip install datasets (or paca[data])"
        ) from None
    return datasets


def _load_source(source: str, section: DataSection, split: str) -> Any:
    """Rows of ``source`` (a list or a ``datasets.Dataset``)."""
    if sources.is_real_source(source):
        return _real(source, section, split)[0]
    path = Path(source).expanduser()
    if path.suffix in _FILE_SUFFIXES or source.startswith((".", "/", "~")) or path.exists():
        if path.is_file():
            if path.suffix not in _FILE_SUFFIXES:
                raise ExperimentError(
                    f"dataset file {path}: unsupported type {path.suffix!r}; use .jsonl, .json "
                    f"or .csv, or a datasets save_to_disk folder"
                )
            return _read_file(path)
        if path.is_dir():
            markers = ("dataset_info.json", "state.json", "dataset_dict.json")
            if not any((path / m).is_file() for m in markers):
                raise DatasetNotFoundError(
                    f"dataset folder {path.resolve()} is not a datasets save_to_disk folder "
                    f"(looked for {', '.join(markers)})"
                )
            ds = _datasets_module(f"dataset folder {path}").load_from_disk(str(path))
            return _pick_split(ds, split, f"dataset folder {path}")
        raise DatasetNotFoundError(
            f"dataset {source!r}: looked for the local file or folder {path.resolve()}, "
            f"which does not exist"
        )
    datasets = _datasets_module(f"hub dataset {source!r}")
    try:
        return datasets.load_dataset(source, section.config_name or None, split=split)
    except Exception as exc:  # the hub client raises many types; the message says it all
        raise DatasetNotFoundError(
            f"dataset {source!r} could not be loaded. Looked for: a built-in set "
            f"({', '.join(BUILTINS + tuple(sources.source_names()))}), a local file or folder {path.resolve()} (does not "
            f"exist), and the hub dataset {source!r} (split {split!r}): {exc}"
        ) from exc


def _cap(rows: Any, n: int) -> Any:
    if not n or len(rows) <= n:
        return rows
    return rows.select(range(n)) if hasattr(rows, "select") else rows[:n]


def _split_off(rows: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Seeded random split of ``rows`` into (train, held-out ``fraction``)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    if hasattr(rows, "select"):
        return rows.select(train_idx), rows.select(eval_idx)
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def _count_labels(rows: Any, section: DataSection) -> int:
    features = getattr(rows, "features", None)
    if features is not None:
        name = _label_column(rows[0] if len(rows) else {}, section)
        feature = features.get(name) if name else None
        if feature is not None and hasattr(feature, "num_classes"):
            return int(feature.num_classes)
        if name:
            return int(max(rows[name])) + 1 if len(rows) else 0
    name = _label_column(rows[0], section) if len(rows) else None
    return max(int(r[name]) for r in rows) + 1 if name else 0


def _real(name: str, section: DataSection, split: str) -> tuple[list[dict[str, Any]], int]:
    """Rows and class count of a shipped real data set; errors become experiment errors."""
    try:
        return sources.load_source(name, split, section.seq_len)
    except sources.UnknownSourceError as exc:
        raise ExperimentError(str(exc)) from None


def _real_splits(section: DataSection, seed: int) -> Splits:
    """``[data].train`` is a shipped real set: its fixed splits, eval ``test`` by default."""
    train, labels = _real(section.train, section, section.train_split)
    evaluation: Any
    if section.eval:
        if section.eval in BUILTINS:
            raise ExperimentError(
                "[data].eval may name a generated set only when [data].train is one"
            )
        evaluation = _load_source(section.eval, section, section.eval_split or "test")
    elif section.eval_fraction > 0:
        train, evaluation = _split_off(train, section.eval_fraction, seed)
    else:
        evaluation = _real(section.train, section, section.eval_split or "test")[0]
    train = _cap(train, section.max_train_samples)
    evaluation = _cap(evaluation, section.max_eval_samples)
    return Splits(train, evaluation, section.num_labels or labels)


def load_splits(section: DataSection, seed: int) -> Splits:
    """Load train and eval rows as the ``[data]`` section says."""
    if sources.is_real_source(section.train):
        return _real_splits(section, seed)
    train_n, eval_n = section.max_train_samples, section.max_eval_samples
    if section.train in BUILTINS:
        builtin_labels = section.num_labels or 10
        train = _builtin(
            section.train, train_n or DEFAULT_BUILTIN_SIZES[0], seed, section.image_size,
            builtin_labels,
        )  # fmt: skip
        evaluation = None
        if section.eval in BUILTINS or (not section.eval and section.eval_fraction == 0):
            name = section.eval or section.train
            evaluation = _builtin(
                name, eval_n or DEFAULT_BUILTIN_SIZES[1], seed + 1, section.image_size,
                builtin_labels,
            )  # fmt: skip
        elif section.eval:
            evaluation = _cap(
                _load_source(section.eval, section, section.eval_split or "train"), eval_n
            )
        else:
            train, evaluation = _split_off(train, section.eval_fraction, seed)
        labels = builtin_labels if section.train == BUILTIN_IMAGES else 0
        return Splits(train, evaluation, labels)

    train = _load_source(section.train, section, section.train_split)
    evaluation = None
    if section.eval:
        if section.eval in BUILTINS:
            raise ExperimentError(
                "[data].eval may name a built-in set only when [data].train is built in"
            )
        evaluation = _load_source(section.eval, section, section.eval_split or section.train_split)
    elif section.eval_split:
        evaluation = _load_source(section.train, section, section.eval_split)
    elif section.eval_fraction > 0:
        train, evaluation = _split_off(train, section.eval_fraction, seed)
    if len(train) == 0:
        raise ExperimentError(f"dataset {section.train!r} has no rows")
    train = _cap(train, train_n)
    evaluation = _cap(evaluation, eval_n) if evaluation is not None else None
    labels = section.num_labels
    if not labels and _label_column(train[0], section) and _image_column(train[0], section):
        labels = _count_labels(train, section)
    return Splits(train, evaluation, labels)


# --------------------------------------------------------------------- formatting
def _first(row: dict[str, Any], *names: str) -> str | None:
    return next((n for n in names if n and n in row), None)


def _label_column(row: dict[str, Any], section: DataSection) -> str | None:
    return _first(row, section.label_field, "label", "labels", "fine_label")


def _image_column(row: dict[str, Any], section: DataSection) -> str | None:
    return _first(row, section.image_field, "image", "img", "pixel_values")


def detect_format(row: dict[str, Any], section: DataSection) -> str:
    """``section.format``, or the format the columns of ``row`` imply."""
    if section.format != "auto":
        return section.format
    if _first(row, section.messages_field, "messages", "conversations"):
        return "chat"
    if _first(row, section.instruction_field) and _first(row, section.response_field, "output"):
        return "instruction"
    if _first(row, section.text_field):
        return "text"
    if _image_column(row, section) and _label_column(row, section):
        return "image"
    raise ExperimentError(
        f"cannot tell how to use rows with columns {sorted(row)}: expected "
        f"'{section.messages_field}' (chat), '{section.instruction_field}' + "
        f"'{section.response_field}' (instruction), '{section.text_field}' (text), or "
        f"'{section.image_field}' + '{section.label_field}' (image); set [data].format and "
        f"the *_field keys"
    )


def _field(row: dict[str, Any], name: str | None, what: str, section_key: str) -> Any:
    if name is None or name not in row:
        raise ExperimentError(
            f"row has no {what} column (columns: {sorted(row)}); set [data].{section_key}"
        )
    return row[name]


def _as_text_example(row: dict[str, Any], fmt: str, section: DataSection, tokenizer: Any) -> Any:
    """A ``{"instruction", "response"}`` dict or a plain string for :func:`tokenize_for_clm`."""
    if fmt == "text":
        return str(_field(row, _first(row, section.text_field), "text", "text_field"))
    if fmt == "instruction":
        instruction = str(
            _field(row, _first(row, section.instruction_field), "instruction", "instruction_field")
        )
        context = row.get(section.input_field) if section.input_field else None
        if context:
            instruction = f"{instruction}\n\n{context}"
        response = _field(
            row, _first(row, section.response_field, "output"), "response", "response_field"
        )
        return {"instruction": instruction, "response": str(response)}
    if fmt == "chat":
        turns = _field(
            row, _first(row, section.messages_field, "messages", "conversations"), "chat",
            "messages_field",
        )  # fmt: skip
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(turns, tokenize=False)
        return "".join(f"### {t['role'].capitalize()}: {t['content']}\n" for t in turns)
    raise ExperimentError(f"format {fmt!r} is not a text format")


class TextDataset(torch.utils.data.Dataset):
    """Rows tokenized on access to ``seq_len`` tokens (static shapes: padded, truncated)."""

    def __init__(self, rows: Any, tokenizer: Any, section: DataSection) -> None:
        if len(rows) == 0:
            raise ExperimentError("a text split has no rows")
        self.rows, self.tokenizer, self.section = rows, tokenizer, section
        self.format = detect_format(dict(rows[0]), section)
        if self.format == "image":
            raise ExperimentError(
                "the data looks like images but the model is a causal LM; check [model].name "
                "and [data].format"
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from paca.tiny import tokenize_for_clm

        example = _as_text_example(dict(self.rows[i]), self.format, self.section, self.tokenizer)
        batch = tokenize_for_clm(
            [example], self.tokenizer, seq_len=self.section.seq_len,
            mask_prompt=self.section.mask_prompt,
        )  # fmt: skip
        return {k: v[0] for k, v in batch.items()}


def _to_tensor_image(image: Any, size: int) -> torch.Tensor:
    """A ``(C, size, size)`` float tensor in about [-1, 1] from a tensor, array or PIL image."""
    if isinstance(image, torch.Tensor):
        t = image.float()
    else:
        import numpy as np

        if hasattr(image, "convert"):
            image = image.convert("RGB")
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[..., None].repeat(3, axis=-1)
        t = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
    if size and t.shape[-1] != size:
        t = torch.nn.functional.interpolate(
            t[None], size=(size, size), mode="bilinear", align_corners=False
        )[0]
    return t


class ImageDataset(torch.utils.data.Dataset):
    """Rows converted on access to ``pixel_values`` + ``labels``."""

    def __init__(self, rows: Any, section: DataSection, processor: Any, image_size: int) -> None:
        if len(rows) == 0:
            raise ExperimentError("an image split has no rows")
        first = dict(rows[0])
        self.image_col = _image_column(first, section)
        self.label_col = _label_column(first, section)
        if self.image_col is None or self.label_col is None:
            raise ExperimentError(
                f"image rows need an image and a label column (columns: {sorted(first)}); set "
                f"[data].image_field and [data].label_field"
            )
        self.rows, self.processor = rows, processor
        self.size = section.image_size or image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        image, label = row[self.image_col], int(row[self.label_col])
        if self.processor is not None and not isinstance(image, torch.Tensor):
            if hasattr(image, "convert"):
                image = image.convert("RGB")
            pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        else:
            pixels = _to_tensor_image(image, self.size)
        return {"pixel_values": pixels, "labels": torch.tensor(label, dtype=torch.long)}


def build_dataset(rows: Any, loaded: Any, section: DataSection) -> torch.utils.data.Dataset:
    """The torch dataset for ``loaded.task`` (a :class:`~paca.experiment.model_loader.LoadedModel`)."""
    if loaded.task == "image-classification":
        return ImageDataset(rows, section, loaded.image_processor, loaded.image_size)
    return TextDataset(rows, loaded.tokenizer, section)
