"""The PaCA linear operation as one autograd function.

Forward is a single GEMM with the effective weight (W with ``W[:, idx] + delta`` in
the trained columns). Backward gives ``dX = dY @ W_eff`` and
``d(delta) = dY^T @ x[..., idx]`` accumulated in fp32. Only ``x[..., idx]`` (r of
the ``in`` input channels) is saved, never the whole input; W, delta and idx are
parameters/buffers that exist anyway. Every device-specific step goes through the
backend, so this file is the same on every device.
"""

from __future__ import annotations

from typing import Any

import torch

from paca.backend_abc import Backend
from paca.steps import queue_backward_end


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device types torch's autocast does not know
        return None
    return None


class PacaLinearFunction(torch.autograd.Function):
    """``y = x @ W_eff^T + b`` saving only the selected input channels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
        backend: Backend,
    ) -> torch.Tensor:
        if ctx.needs_input_grad[1]:
            raise RuntimeError(
                "a PaCA layer's base weight requires grad, but PaCA saves only the selected "
                "input channels and cannot compute a dense weight gradient. Keep base weights "
                "frozen (paca.wrap does this) or unload the adapter for full fine-tuning."
            )
        device_type = x.device.type
        compute = autocast_dtype(device_type)
        w_eff = backend.effective_weight(weight, idx, delta)
        if compute is not None:  # do autocast's casts ourselves, once, and save the cast input
            x_c = x.to(compute)
            w_eff = w_eff.to(compute)
            bias_c = bias.to(compute) if bias is not None else None
            with torch.autocast(device_type=device_type, enabled=False):
                y = backend.linear(x_c, w_eff, bias_c)
        else:
            x_c, bias_c = x, bias
            y = backend.linear(x_c, w_eff, bias_c)
        x_sel = backend.gather(x_c, idx, dim=-1)
        ctx.save_for_backward(x_sel, weight, delta, idx)
        ctx.backend = backend
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_sel, weight, delta, idx = ctx.saved_tensors
        backend: Backend = ctx.backend
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            w_eff = backend.effective_weight(weight, idx, delta).to(grad_out.dtype)
            grad_x = backend.input_grad(grad_out, w_eff).to(ctx.x_dtype)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:
            flat_x = x_sel.reshape(-1, x_sel.shape[-1])
            grad_delta = backend.delta_grad(flat_grad, flat_x).to(delta.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.float().sum(0).to(ctx.bias_dtype)
        queue_backward_end(backend)
        return grad_x, None, grad_bias, grad_delta, None, None


def paca_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: Backend,
) -> torch.Tensor:
    """Functional PaCA linear (see :class:`PacaLinearFunction`)."""
    return PacaLinearFunction.apply(x, weight, bias, delta, idx, backend)
