"""Small test utilities shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def saved_activation_bytes(
    fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()
) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """Run ``fn`` and count bytes autograd saves for backward, excluding ``exclude``.

    Tensors sharing storage with an excluded tensor (parameters, buffers and views of
    them) are not activations and are left out.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in excluded:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(t.numel() * t.element_size() for t in saved)
    return out, total, saved


def params_and_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
