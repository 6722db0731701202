"""`PacaConfig`: everything that decides which weights PaCA trains.

The config is saved next to an adapter; together with the saved indices it
reproduces exactly the same trained columns on reload.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: ``target_modules`` value meaning "every supported layer except the output head".
ALL_LINEAR = "all-linear"
_DTYPES = {"float32", "bfloat16", "float16"}


@dataclass
class PacaConfig:
    """Which layers PaCA adapts and how it picks their trained columns.

    Args:
        r: trained input columns per layer (1 <= r <= in_features).
        target_modules: module names to adapt: a list matched against the end of each
            qualified module name (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``),
            a string taken as a regular expression that must match the whole name, or
            ``"all-linear"`` (every supported layer but the output head).
        exclude_modules: same forms as ``target_modules``; matches are never adapted.
        seed: seed of the column choice; same seed + same module name gives the same
            columns on every machine and backend.
        selection: column-selection strategy: ``"random"`` (paper default),
            ``"weight_norm"`` or ``"gradient"`` (see :mod:`paca.selection`); recorded with a
            saved adapter, whose saved indices are nevertheless what a reload uses.
        selection_options: keyword options of the strategy (JSON values, e.g.
            ``{"largest": False}``).
        indices: explicit columns per module name; these override ``selection``.
        delta_dtype: dtype of the trainable ``delta`` (``"float32"`` keeps fp32 master
            values for a bf16/fp16 model, like PEFT's adapter autocast); ``None`` uses the
            weight's dtype.
        modules_to_save: modules trained in full next to the adapter (e.g. a new
            classification head), named like list-form ``target_modules`` (the whole name
            or its end after a dot). Each gets a trainable copy per adapter; the original
            stays untouched and the copy is saved with the adapter. A name that matches
            nothing, or a module that is also a PaCA target, is an error.
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

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"PacaConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("PacaConfig.target_modules is empty: name at least one module")
        if self.delta_dtype is not None and self.delta_dtype not in _DTYPES:
            raise ValueError(
                f"PacaConfig.delta_dtype must be one of {sorted(_DTYPES)} or None, "
                f"got {self.delta_dtype!r}"
            )
        if not isinstance(self.selection, str):
            raise TypeError(f"PacaConfig.selection must be a strategy name, got {self.selection!r}")
        try:  # the config is saved next to the adapter, so it must be plain JSON
            json.dumps(self.selection_options)
        except TypeError as e:
            raise TypeError(
                f"PacaConfig.selection_options must be JSON values (it is saved with the "
                f"adapter): {e}. Pass data such as calibration batches to paca.wrap instead."
            ) from None
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = sorted(self.modules_to_save)
        if self.modules_to_save is not None:
            if not all(isinstance(n, str) and n for n in self.modules_to_save):
                raise TypeError(
                    f"PacaConfig.modules_to_save must be a list of module names, "
                    f"got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save) or None
        if self.indices is not None:
            self.indices = {k: [int(i) for i in v] for k, v in self.indices.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": "PACA", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PacaConfig:
        data = {k: v for k, v in data.items() if k not in {"peft_type", "paca_version"}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown PacaConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
