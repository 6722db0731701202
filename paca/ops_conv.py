"""The PaCA 2-D convolution as one autograd function.

PaCA on ``nn.Conv2d`` trains ``r`` of the ``in_channels``: every kernel position of a
chosen channel is trained together, so ``delta`` is ``(out, r, kh, kw)``. Forward is one
convolution with the effective kernel (``round(W[:, idx] + delta)`` in the chosen
channels). Backward gives the input gradient from the effective kernel (no saved input
needed) and ``d(delta)`` from only the ``r`` selected input channels, which is all this
op saves. The layer step is the backend's :meth:`Backend.conv2d_forward` /
:meth:`Backend.conv2d_backward`; the core does the casts and the contract checks.
"""

from __future__ import annotations

from typing import Any

import torch

from paca import backend_call as bc
from paca.backend_abc import Backend
from paca.ops import BASE_WEIGHT_GRAD_MESSAGE, autocast_dtype, no_autocast
from paca.steps import queue_backward_end

Pair = tuple[int, int]


def _dtypes(x: torch.Tensor, weight: torch.Tensor, backend: Backend) -> torch.dtype:
    compute = autocast_dtype(x.device.type)
    if compute is None and x.dtype != weight.dtype:
        raise TypeError(
            f"PaCA conv2d: input dtype {x.dtype} != weight dtype {weight.dtype}; cast the "
            f"input (x.to({weight.dtype})) or run under torch.autocast"
        )
    dtype = compute or x.dtype
    bc.require_dtype(backend, dtype, "this PaCA conv2d layer")
    return dtype


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
        dtype = _dtypes(x, weight, backend)
        member = "conv2d_forward"
        with no_autocast(x.device.type):
            x_c = x.to(dtype)
            w = weight.to(dtype)
            bias_c = bias.to(dtype) if bias is not None else None
            d = bc.delta_for(backend, delta)
            out = bc.call(
                backend,
                member,
                backend.conv2d_forward,
                x_c,
                w,
                bias_c,
                d,
                idx,
                stride,
                padding,
                dilation,
            )
        y, x_sel = bc.check_pair(backend, member, out)
        spatial = tuple(
            (size + 2 * p - d * (k - 1) - 1) // st + 1
            for size, p, d, k, st in zip(
                x.shape[2:], padding, dilation, weight.shape[2:], stride, strict=True
            )
        )
        bc.check_tensor(backend, member, "y", y, (x.shape[0], weight.shape[0], *spatial), dtype)
        bc.check_tensor(
            backend, member, "x_sel", x_sel, (x.shape[0], idx.shape[0], *x.shape[2:]), dtype
        )
        bc.check_owns_storage(backend, member, "x_sel", x_sel, x_c)
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
        need_x, need_delta = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[3])
        grad_x = grad_bias = grad_delta = None
        if need_x or need_delta:
            member = "conv2d_backward"
            dtype = x_sel.dtype
            with no_autocast(grad_out.device.type):
                d = bc.delta_for(backend, delta)
                out = bc.call(
                    backend,
                    member,
                    backend.conv2d_backward,
                    grad_out.to(dtype),
                    x_sel,
                    weight.to(dtype),
                    d,
                    idx,
                    ctx.x_shape,
                    stride,
                    padding,
                    dilation,
                    need_x,
                    need_delta,
                )
            grad_x, grad_delta = bc.check_pair(backend, member, out)
            if need_x:
                grad_x = bc.check_tensor(backend, member, "grad_x", grad_x, ctx.x_shape, dtype)
                grad_x = grad_x.to(ctx.x_dtype)
            else:
                grad_x = None
            if need_delta:
                grad_delta = bc.check_tensor(
                    backend, member, "grad_delta", grad_delta, tuple(d.shape), d.dtype
                ).to(delta.dtype)
            else:
                grad_delta = None
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
