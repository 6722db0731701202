"""`PacaConfig`: everything that decides which weights PaCA trains.

The config is saved next to an adapter; together with the saved indices it
reproduces exactly the same trained columns on reload.

Every field is checked when the config is built *and* whenever a field is assigned
(``cfg.r = 0`` is refused at once), and :meth:`PacaConfig.validate` re-checks all of
them (``paca.wrap`` calls it, so a list mutated in place is caught before any layer is
touched). A bad value raises :class:`PacaConfigError` (both a ``TypeError`` and a
``ValueError``) naming the field, the value and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``target_modules`` value meaning "every supported layer except the output head".
ALL_LINEAR = "all-linear"
#: ``delta_dtype`` values (torch dtype names) besides ``None`` (the weight's dtype).
DELTA_DTYPES = frozenset({"float32", "bfloat16", "float16"})


class PacaConfigError(TypeError, ValueError):
    """A :class:`PacaConfig` field (or a ``paca.wrap`` argument) has a wrong type or value.

    It is both a ``TypeError`` and a ``ValueError``, so either ``except`` catches it.
    """


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def as_int(value: Any, what: str, fix: str) -> int:
    """``value`` as an int if it is an integer (Python, NumPy or 0-d torch), else an error.

    Floats are refused, never truncated; bools and strings (``"1"``) are refused too.
    """
    if isinstance(value, (bool, str, bytes)):
        raise PacaConfigError(f"{what} must be an int, got {_show(value)}; {fix}")
    try:
        return operator.index(value)
    except TypeError:
        raise PacaConfigError(f"{what} must be an int, got {_show(value)}; {fix}") from None


def check_pattern(value: Any, what: str) -> list[str] | str | None:
    """A module-name pattern: ``None``, a regex string, or a list of names (sorted if a set)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return value
        if not value:
            raise PacaConfigError(
                f"{what} is the empty string, which matches no module; pass a regular "
                f"expression, a list of module names or None"
            )
        try:
            re.compile(value)
        except re.error as e:
            raise PacaConfigError(
                f"{what}={value!r} is not a valid regular expression ({e}); a string is a "
                f"regular expression that must match the whole module name: fix it, escape "
                f"special characters with re.escape(), or pass a list of module names"
            ) from None
        return value
    if isinstance(value, (set, frozenset, tuple)):  # sorted: a set has no order to keep
        items = list(value)
        if all(isinstance(v, str) for v in items):
            items = sorted(items)
    elif isinstance(value, list):
        items = list(value)
    else:
        raise PacaConfigError(
            f"{what} must be a module name list (e.g. ['q_proj', 'v_proj']) or a regular "
            f"expression string, got {_show(value)}"
        )
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise PacaConfigError(
                f"{what} must hold module names as non-empty strings; item {i} is "
                f"{_show(item)} (e.g. ['q_proj', 'v_proj'])"
            )
        if item == ALL_LINEAR:
            raise PacaConfigError(
                f"{what} lists {ALL_LINEAR!r} among names; {ALL_LINEAR!r} must be given "
                f"alone, as {what.rsplit('.', 1)[-1]}={ALL_LINEAR!r}"
            )
    return items


def check_index_list(value: Any, what: str) -> list[int]:
    """Column indices as a list of distinct non-negative ints (upper bound: at wrap)."""
    fix = "give column numbers as ints, e.g. [0, 5, 17]"
    tolist = getattr(value, "tolist", None)
    if not isinstance(value, (list, tuple, range, set, frozenset)) and callable(tolist):
        dtype = getattr(value, "dtype", None)  # a torch tensor or NumPy array
        if dtype is not None and (
            getattr(dtype, "is_floating_point", False)
            or getattr(dtype, "is_complex", False)
            or str(dtype).startswith(("float", "complex", "bool", "torch.bool"))
        ):
            raise PacaConfigError(f"{what} must hold ints, got a {dtype} array; {fix}")
        value = tolist()
        if not isinstance(value, list):
            value = [value]
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=lambda v: (str(type(v)), v))
    if not isinstance(value, (list, tuple, range)):
        raise PacaConfigError(f"{what} must be a list of column indices, got {_show(value)}; {fix}")
    out = []
    for i, item in enumerate(value):
        n = as_int(item, f"{what}[{i}]", f"{fix} (floats are not truncated)")
        if n < 0:
            raise PacaConfigError(f"{what}[{i}] is {n}, but column indices are >= 0; {fix}")
        out.append(n)
    if not out:
        raise PacaConfigError(f"{what} is empty; {fix}")
    seen: set[int] = set()
    dups = sorted({n for n in out if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dups:
        raise PacaConfigError(
            f"{what} must be distinct column indices; it repeats {dups} (got {out[:20]})"
        )
    return out


def _r(v: Any) -> int:
    n = as_int(v, "PacaConfig.r", "pass the number of trained columns per layer, e.g. r=8")
    if n < 1:
        raise PacaConfigError(
            f"PacaConfig.r must be a positive int (1 <= r <= in_features), got {n}; e.g. r=8"
        )
    return n


def _seed(v: Any) -> int:
    return as_int(v, "PacaConfig.seed", "pass an int such as seed=0")


def _target_modules(v: Any) -> list[str] | str:
    out = check_pattern(v, "PacaConfig.target_modules")
    if out is None:
        return ALL_LINEAR
    if isinstance(out, list) and not out:
        raise PacaConfigError(
            f"PacaConfig.target_modules is empty: name at least one module, or pass {ALL_LINEAR!r}"
        )
    return out


def _exclude_modules(v: Any) -> list[str] | str | None:
    out = check_pattern(v, "PacaConfig.exclude_modules")
    return out or None


def _selection(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise PacaConfigError(
            f"PacaConfig.selection must be a strategy name such as 'random', 'weight_norm' "
            f"or 'gradient', got {_show(v)}"
        )
    return v


def _selection_options(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise PacaConfigError(
            f"PacaConfig.selection_options must be a dict of keyword options (e.g. "
            f"{{'largest': False}}), got {_show(v)}"
        )
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
        raise PacaConfigError(
            f"PacaConfig.selection_options keys must be option names (str), got {bad[:5]}"
        )
    try:  # the config is saved next to the adapter, so it must be plain JSON
        json.dumps(dict(v))
    except (TypeError, ValueError) as e:
        raise PacaConfigError(
            f"PacaConfig.selection_options must be JSON values (it is saved with the "
            f"adapter): {e}. Pass data such as calibration batches to paca.wrap instead."
        ) from None
    return dict(v)


def _indices(v: Any) -> dict[str, list[int]] | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise PacaConfigError(
            f"PacaConfig.indices must map module names to column lists (e.g. "
            f"{{'model.layers.0.self_attn.q_proj': [3, 17, 40]}}), got {_show(v)}"
        )
    out: dict[str, list[int]] = {}
    for k, cols in v.items():
        if not isinstance(k, str) or not k:
            raise PacaConfigError(
                f"PacaConfig.indices keys must be qualified module names (str), got {_show(k)}"
            )
        out[k] = check_index_list(cols, f"PacaConfig.indices[{k!r}]")
    return out


def _delta_dtype(v: Any) -> str | None:
    if v is None:
        return None
    name = str(v).removeprefix("torch.") if type(v).__name__ == "dtype" else v
    if not isinstance(name, str) or name not in DELTA_DTYPES:
        raise PacaConfigError(
            f"PacaConfig.delta_dtype must be one of {sorted(DELTA_DTYPES)} or None, got {_show(v)}"
        )
    return name


def _modules_to_save(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if isinstance(v, (tuple, set, frozenset)):
        v = sorted(v) if all(isinstance(n, str) for n in v) else list(v)
    if not isinstance(v, list) or not all(isinstance(n, str) and n for n in v):
        raise PacaConfigError(
            f"PacaConfig.modules_to_save must be a list of module names, got {_show(v)} "
            f"(e.g. ['classifier'])"
        )
    return list(v) or None


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "r": _r,
    "target_modules": _target_modules,
    "exclude_modules": _exclude_modules,
    "seed": _seed,
    "selection": _selection,
    "selection_options": _selection_options,
    "indices": _indices,
    "delta_dtype": _delta_dtype,
    "modules_to_save": _modules_to_save,
}


@dataclass
class PacaConfig:
    """Which layers PaCA adapts and how it picks their trained columns.

    Args:
        r: trained input columns per layer, an int with 1 <= r <= in_features.
        target_modules: module names to adapt: a list matched against the end of each
            qualified module name (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``),
            a string taken as a regular expression that must match the whole name, or
            ``"all-linear"`` (every supported layer but the output head).
        exclude_modules: same forms as ``target_modules``; matches are never adapted.
        seed: int seed of the column choice; same seed + same module name gives the same
            columns on every machine and backend.
        selection: column-selection strategy: ``"random"`` (paper default),
            ``"weight_norm"`` or ``"gradient"`` (see :mod:`paca.selection`); recorded with a
            saved adapter, whose saved indices are nevertheless what a reload uses.
        selection_options: keyword options of the strategy (JSON values, e.g.
            ``{"largest": False}``).
        indices: explicit columns per module name (distinct ints); these override
            ``selection``.
        delta_dtype: dtype of the trainable ``delta`` (``"float32"`` keeps fp32 master
            values for a bf16/fp16 model, like PEFT's adapter autocast); ``None`` uses the
            weight's dtype.
        modules_to_save: modules trained in full next to the adapter (e.g. a new
            classification head), named like list-form ``target_modules`` (the whole name
            or its end after a dot). Each gets a trainable copy per adapter; the original
            stays untouched and the copy is saved with the adapter. A name that matches
            nothing, or a module that is also a PaCA target, is an error.

    Raises:
        PacaConfigError: a field has a wrong type or value (the message names the field,
            the value and the fix).
    """

    r: int = 8
    target_modules: list[str] | str | None = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    seed: int = 0
    selection: str = "random"
    selection_options: dict[str, Any] = field(default_factory=dict)
    indices: dict[str, list[int]] | None = None
    delta_dtype: str | None = "float32"
    modules_to_save: list[str] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        check = _VALIDATORS.get(name)
        object.__setattr__(self, name, check(value) if check is not None else value)

    def validate(self) -> PacaConfig:
        """Re-check every field (catches lists mutated in place); returns ``self``."""
        for name in _VALIDATORS:
            setattr(self, name, getattr(self, name))
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": "PACA", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PacaConfig:
        if not isinstance(data, Mapping):
            raise PacaConfigError(
                f"PacaConfig.from_dict expects a dict of fields, got {_show(data)}"
            )
        data = {k: v for k, v in data.items() if k not in {"peft_type", "paca_version"}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise PacaConfigError(
                f"unknown PacaConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PacaConfig:
        """The config :meth:`to_json` wrote."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PacaConfigError(f"PacaConfig.from_json: not valid JSON ({e})") from None
        return cls.from_dict(data)
