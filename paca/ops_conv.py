"""The PaCA 2-D convolution as one autograd function.

PaCA on ``nn.Conv2d`` trains ``r`` of the ``in_channels``: every kernel position of a
chosen channel is trained together, so ``delta`` is ``(out, r, kh, kw)``. Forward is one
convolution with the effective kernel (``W[:, idx] + delta`` in the chosen channels).
Backward gives the input gradient from the effective kernel (no saved input needed)
and ``d(delta)`` from only the ``r`` selected input channels, which is all this op
saves. Device work goes through the backend's conv primitives.
"""

from __future__ import annotations

from typing import Any

import torch

from paca.backend_abc import Backend
from paca.ops import BASE_WEIGHT_GRAD_MESSAGE, autocast_dtype
from paca.steps import queue_backward_end

Pair = tuple[int, int]


class PacaConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W_eff, b)`` saving only the selected input channels of ``x``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
        backend: Backend,
        geometry: tuple[Pair, Pair, Pair],
    ) -> torch.Tensor:
        if ctx.needs_input_grad[1]:
            raise RuntimeError(BASE_WEIGHT_GRAD_MESSAGE)
        stride, padding, dilation = geometry
        device_type = x.device.type
        compute = autocast_dtype(device_type)
        w_eff = backend.effective_weight(weight, idx, delta)
        if compute is not None:  # do autocast's casts once ourselves and save the cast input
            x_c = x.to(compute)
            bias_c = bias.to(compute) if bias is not None else None
            with torch.autocast(device_type=device_type, enabled=False):
                y = backend.conv2d(x_c, w_eff.to(compute), bias_c, stride, padding, dilation)
        else:
            x_c = x
            y = backend.conv2d(x_c, w_eff, bias, stride, padding, dilation)
        x_sel = backend.gather(x_c, idx, dim=1)
        ctx.save_for_backward(x_sel, weight, delta, idx)
        ctx.backend = backend
        ctx.geometry = geometry
        ctx.x_shape = tuple(x.shape)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_sel, weight, delta, idx = ctx.saved_tensors
        backend: Backend = ctx.backend
        stride, padding, dilation = ctx.geometry
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            w_eff = backend.effective_weight(weight, idx, delta).to(grad_out.dtype)
            grad_x = backend.conv2d_input_grad(
                grad_out, w_eff, ctx.x_shape, stride, padding, dilation
            ).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_delta = backend.conv2d_delta_grad(
                grad_out.to(x_sel.dtype), x_sel, tuple(delta.shape), stride, padding, dilation
            ).to(delta.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.float().sum((0, 2, 3)).to(ctx.bias_dtype)
        queue_backward_end(backend)
        return grad_x, None, grad_bias, grad_delta, None, None, None


def paca_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: Backend,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> torch.Tensor:
    """Functional PaCA conv2d (see :class:`PacaConv2dFunction`); ``x`` is ``(N, C, H, W)``."""
    if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
        return paca_conv2d(
            x.unsqueeze(0), weight, bias, delta, idx, backend, stride, padding, dilation
        ).squeeze(0)
    return PacaConv2dFunction.apply(
        x, weight, bias, delta, idx, backend, (stride, padding, dilation)
    )
