"""The definition of correct results: a dense autograd computation, on the CPU, in fp64.

No backend is involved. ``W_eff`` is built densely: the weight with columns ``idx``
replaced by ``round(W[:, idx] + delta)`` (added in fp32, rounded once to the weight's
dtype, as the contract says), then ``F.linear`` / ``F.conv2d`` run in fp64 on the same
(rounded) inputs the backend got, and autograd gives the gradients:
``dX = dL/dx`` and ``d(delta) = dL/dW_eff[:, idx]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Pair = tuple[int, int]


def cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def effective_weight(weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight`` with ``round(W[:, idx] + delta)`` (fp32 add, rounded once) in columns ``idx``."""
    w, i = cpu(weight), cpu(idx)
    columns = (w.index_select(1, i).float() + cpu(delta).float()).to(w.dtype)
    return w.index_copy(1, i, columns)


def written_columns(weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """What ``write_columns(weight, idx, columns)`` leaves in ``weight``."""
    w = cpu(weight).clone()
    w.index_copy_(1, cpu(idx), cpu(columns).to(w.dtype))
    return w


@dataclass
class Dense:
    """fp64 results of a dense layer: output, input gradient, full weight gradient."""

    y: torch.Tensor
    dx: torch.Tensor
    dw: torch.Tensor


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad_out: torch.Tensor
) -> Dense:
    """``y = F.linear(x, weight, bias)`` and its gradients for ``grad_out``, in fp64."""
    xd = cpu(x).double().requires_grad_(True)
    wd = cpu(weight).double().requires_grad_(True)
    bd = cpu(bias).double() if bias is not None else None
    with torch.enable_grad():
        y = F.linear(xd, wd, bd)
        y.backward(cpu(grad_out).double())
    return Dense(y.detach(), xd.grad, wd.grad)  # type: ignore[arg-type]


def dense_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Dense:
    """``y = F.conv2d(x, weight, bias, ...)`` and its gradients for ``grad_out``, in fp64."""
    xd = cpu(x).double().requires_grad_(True)
    wd = cpu(weight).double().requires_grad_(True)
    bd = cpu(bias).double() if bias is not None else None
    with torch.enable_grad():
        y = F.conv2d(xd, wd, bd, stride, padding, dilation)
        if grad_out is None:
            return Dense(y.detach(), torch.empty(0), torch.empty(0))
        y.backward(cpu(grad_out).double())
    return Dense(y.detach(), xd.grad, wd.grad)  # type: ignore[arg-type]


def conv_out_shape(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: Pair, padding: Pair, dilation: Pair
) -> tuple[int, ...]:
    spatial = tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(
            x_shape[2:], padding, dilation, w_shape[2:], stride, strict=True
        )
    )
    return (x_shape[0], w_shape[0], *spatial)
