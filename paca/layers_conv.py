"""PaCA around transformers ``Conv1D`` (GPT-2 family) and ``nn.Conv2d``.

``Conv1D`` stores its weight ``(in, out)``: PaCA selects rows of it (= input
features) and computes with the linear op on a transposed *view*, so no weight is
copied. ``nn.Conv2d`` (groups=1) trains ``r`` whole input channels, every kernel
position of a chosen channel together, so backward needs only those ``r`` channels.

Both are registered as layer types in :mod:`paca.layer`.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paca.layers_base import PacaLayer
from paca.ops import paca_linear
from paca.ops_conv import Pair, paca_conv2d


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (without importing transformers)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None) if utils is not None else None
    if cls is None or not isinstance(module, cls):
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == module.nf


class PacaConv1D(PacaLayer):
    """PaCA around transformers ``Conv1D``: ``y = x @ W + b`` with ``W`` stored ``(in, out)``."""

    def oi_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.t()  # a view: merges write through to the parameter

    def paca_forward(self, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return paca_linear(x, base.weight.t(), base.bias, delta, idx, self.backend)


def is_plain_conv2d(module: nn.Module) -> bool:
    """The modules :class:`PacaConv2d` adapts: ``nn.Conv2d`` with ``groups=1`` and an
    initialized weight."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and not isinstance(module.weight, nn.parameter.UninitializedParameter)
    )


class PacaConv2d(PacaLayer):
    """PaCA around ``nn.Conv2d`` with ``groups=1``; ``delta`` is ``(out, r, kh, kw)``."""

    linear_like: ClassVar[bool] = False

    def _geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, Pair, Pair, Pair]:
        """The input (pre-padded where the base conv pads by itself) and conv geometry."""
        base: nn.Conv2d = self.base_layer
        stride, dilation = tuple(base.stride), tuple(base.dilation)
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return x, stride, (0, 0), dilation  # type: ignore[return-value]
        if base.padding == "valid":
            return x, stride, (0, 0), dilation  # type: ignore[return-value]
        if base.padding == "same":
            pads, extra = [], []
            for d, k in zip(base.dilation, base.kernel_size, strict=True):
                total = d * (k - 1)
                pads.append(total // 2)
                extra.append(total - 2 * (total // 2))
            if any(extra):  # asymmetric: torch pads the extra row/column at the end
                x = F.pad(x, [0, extra[1], 0, extra[0]])
            return x, stride, (pads[0], pads[1]), dilation  # type: ignore[return-value]
        return x, stride, tuple(base.padding), dilation  # type: ignore[return-value]

    def paca_forward(self, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        x, stride, padding, dilation = self._geometry(x)
        return paca_conv2d(
            x, base.weight, base.bias, delta, idx, self.backend, stride, padding, dilation
        )
