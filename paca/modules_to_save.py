"""``modules_to_save``: modules trained in full next to a PaCA adapter (PEFT's semantics).

A typical use is a new classification head. :class:`ModulesToSaveWrapper` keeps the
original module untouched (frozen) as ``original_module`` and one trainable deep copy per
adapter in ``modules_to_save[adapter]``; its forward runs the active adapter's copy, or the
original when adapters are disabled or the active adapter has no copy. So ``unload()`` and
``disable_adapter()`` give the pretrained module bit for bit, and a saved adapter carries
the copy's tensors.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

#: child names inside a wrapper; module names containing them are wrapper internals.
ORIGINAL = "original_module"
COPIES = "modules_to_save"


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` (frozen) and per-adapter trainable copies of it."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    # --- adapters ---------------------------------------------------------------
    def add_adapter(self, name: str) -> None:
        """Add a trainable deep copy of the original module for adapter ``name``."""
        if name in self.modules_to_save:
            raise ValueError(f"modules_to_save already has a copy for adapter {name!r}")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Use adapter ``name``'s copy (and make only it trainable)."""
        self.active_adapter = name if name in self.modules_to_save else None
        for adapter, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(adapter == name)

    def active_module(self) -> nn.Module:
        """The module that forward runs now."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Unknown attributes (``weight``, ``out_features`` ...) come from the active module,
        so model code that reads them keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {ORIGINAL, COPIES} or "disabled" not in self.__dict__:
                raise
            return getattr(self.active_module(), name)

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, disabled={self.disabled}"
