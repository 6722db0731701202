"""Names PaCA matches and reports: module paths, adapter names, "did you mean" hints.

Everything here works on names and the module tree alone (no layer types), so target
matching (:mod:`paca.targets`), the model wrapper, saving and loading, and
:func:`paca.quantize_nf4` all match and show names the same way.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from paca.config import PacaConfigError
from paca.modules_to_save import COPIES, ORIGINAL

DEFAULT_ADAPTER = "default"

#: child names of PaCA layers and modules_to_save wrappers that are not model modules.
INTERNAL_PARTS = frozenset({"base_layer", ORIGINAL, COPIES})


# --- "did you mean" ---------------------------------------------------------------
def close_matches(wanted: Iterable[str], choices: Sequence[str], n: int = 3) -> list[str]:
    """The sorted union of the ``n`` closest ``choices`` to each of ``wanted``."""
    return sorted({c for w in wanted for c in difflib.get_close_matches(w, choices, n=n)})


def did_you_mean(wanted: Iterable[str], choices: Sequence[str], n: int = 3) -> str:
    """``"Did you mean: a, b?"`` for the choices close to ``wanted``, or ``""``."""
    close = close_matches(wanted, choices, n)
    return f"Did you mean: {', '.join(close)}?" if close else ""


def type_name(obj: object) -> str:
    """``module.QualifiedName`` of ``obj``'s type, as saved adapters record module types."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# --- adapter names ------------------------------------------------------------------
class UnknownAdapterError(KeyError, ValueError):
    """An adapter name that the model does not have (the message lists those it has)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


def check_adapter_name(name: object, what: str = "adapter_name") -> str:
    """``name`` if it is a valid adapter name (a Python identifier), else a clear error."""
    if not isinstance(name, str) or not name.isidentifier():
        raise PacaConfigError(
            f"{what} must be a valid Python identifier (letters, digits and underscores, not "
            f"starting with a digit; e.g. 'default' or 'task_2'), got {name!r}: adapter "
            f"names become parts of parameter names and folder names"
        )
    return name


def unknown_adapter(name: object, known: Iterable[str]) -> UnknownAdapterError:
    """The error for adapter ``name`` that is not among ``known`` (with the closest one)."""
    known = sorted(known)
    hint = close_matches([name], known, n=1) if isinstance(name, str) else []
    return UnknownAdapterError(
        f"no adapter {name!r}; adapters: {known}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
    )


# --- module paths -------------------------------------------------------------------
def matches(name: str, pattern: list[str] | str | None) -> bool:
    """Whether module ``name`` matches a ``target_modules``-style pattern: a list of names
    or name suffixes (``"q_proj"`` matches ``"layers.0.attn.q_proj"``), or a regex that
    must match the whole name."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def is_internal(name: str) -> bool:
    """Whether ``name`` lies inside a PaCA layer or a modules_to_save wrapper."""
    return any(
        part.startswith(("paca_", "base_layer")) or part in INTERNAL_PARTS
        for part in name.split(".")
    )


def display_name(name: str) -> str:
    """A module or tensor name as the user's model has it (PaCA internals removed)."""
    return ".".join(p for p in name.split(".") if p not in {"base_layer", ORIGINAL})


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule of ``root`` at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of output-embedding layers, which ``all-linear`` leaves alone (as PEFT does)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        with contextlib.suppress(Exception):
            out = get_out()
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads
