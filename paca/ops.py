"""The PaCA linear operation: one implementation, an eager autograd path and a custom op.

Forward is a single GEMM with the effective weight (W with ``round(W[:, idx] + delta)``
in the trained columns). Backward gives ``dX = dY @ W_eff`` and
``d(delta) = dY^T @ x[..., idx]`` accumulated in fp32. Only ``x[..., idx]`` (r of the
``in`` input channels) is saved, never the whole input. The core does dtype handling
(autocast's casts, once), capability and contract checks, the bias gradient and the
step hooks; how the layer step is computed is the backend's
(:meth:`Backend.linear_forward` / :meth:`Backend.linear_backward`), so this file is the
same on every device and a vendor can fuse the whole step.

Graph mode: the op is registered with ``torch.library`` as two custom ops,
``paca::linear`` (forward; returns the output and the saved ``x[..., idx]``) and
``paca::linear_backward``, with fake implementations and an autograd formula.
``torch.compile`` therefore sees one opaque node per PaCA layer: it never traces into
backend code (Triton launches, SDK calls) and never graph-breaks at a PaCA layer.
Custom ops take tensors and plain values only, so the backend travels as a string key
from :func:`backend_key`.

Eager mode takes a plain ``autograd.Function`` around the *same* implementation
functions (dispatching custom ops costs host time on small layers);
:func:`paca_linear` picks the custom op whenever ``torch.compile`` is tracing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from paca import backend_call as bc
from paca.backend_abc import Backend
from paca.steps import queue_backward_end

_KEY_ATTR = "_paca_op_key"
_BACKENDS: dict[str, Backend] = {}

#: Raised by every PaCA op (linear, conv) whose base weight was unfrozen.
BASE_WEIGHT_GRAD_MESSAGE = (
    "a PaCA layer's base weight requires grad, but PaCA saves only the selected "
    "input channels and cannot compute a dense weight gradient. Keep base weights "
    "frozen (paca.wrap does this) or unload the adapter for full fine-tuning."
)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device types torch's autocast does not know
        return None
    return None


# ------------------------------------------------------------------ backend keys
def backend_key(backend: Backend) -> str:
    """The string the custom ops use to find ``backend`` (stable per instance).

    PaCA layers call this when they get their backend, so by the time ``torch.compile``
    traces a layer the key is a plain attribute read folded into a constant.
    """
    key = getattr(backend, _KEY_ATTR, None)
    if key is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"backend {backend.name!r} was first seen inside torch.compile; call "
                f"paca.ops.backend_key(backend) once before compiling (PaCA layers do this)"
            )
        key = f"{backend.name}@{id(backend):x}"
        _BACKENDS[key] = backend
        setattr(backend, _KEY_ATTR, key)
    return key


def backend_for_key(key: str) -> Backend:
    """The backend instance behind a key from :func:`backend_key`."""
    try:
        return _BACKENDS[key]
    except KeyError:
        raise RuntimeError(
            f"paca op called with unknown backend key {key!r}: keys are handed out per process "
            f"by paca.ops.backend_key(); a compiled graph cannot be reused in another process "
            f"without running the model once eagerly there"
        ) from None


def no_autocast(device_type: str) -> Any:
    """Switch autocast off inside the op (its casts are done explicitly, once)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return contextlib.nullcontext()


# ------------------------------------------------------------------ the math, once
def _dtype_error(x: torch.Tensor, weight: torch.Tensor) -> TypeError:
    return TypeError(
        f"PaCA linear: input dtype {x.dtype} != weight dtype {weight.dtype}; cast the input "
        f"(x.to({weight.dtype})) or run under torch.autocast"
    )


def _forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    b: Backend,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W_eff^T + b, x[..., idx])``, both in the compute dtype."""
    if compute_dtype is None and x.dtype != weight.dtype:
        raise _dtype_error(x, weight)
    dtype = compute_dtype or x.dtype
    bc.require_dtype(b, dtype, "this PaCA linear layer")
    with no_autocast(x.device.type):
        x = x.to(dtype)
        w = weight.to(dtype)  # a copy only under autocast (as the frozen layer's cast)
        bias = bias.to(dtype) if bias is not None else None
        d = bc.delta_for(b, delta)
        member = "linear_forward"
        out = bc.call(b, member, b.linear_forward, x, w, bias, d, idx)
    y, x_sel = bc.check_pair(b, member, out)
    lead = tuple(x.shape[:-1])
    bc.check_tensor(b, member, "y", y, (*lead, weight.shape[0]), dtype)
    bc.check_tensor(b, member, "x_sel", x_sel, (*lead, idx.shape[0]), dtype)
    bc.check_owns_storage(b, member, "x_sel", x_sel, x)
    return y, x_sel


def _backward_impl(
    grad_out: torch.Tensor,
    x_sel: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    b: Backend,
    need_input_grad: bool,
    need_delta_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dX, d(delta))`` in the compute dtype and fp32; None where not needed."""
    dtype = x_sel.dtype
    member = "linear_backward"
    with no_autocast(grad_out.device.type):
        g = grad_out.to(dtype)  # e.g. an fp32 loss gradient reaching a bf16 layer
        w = weight.to(dtype)
        d = bc.delta_for(b, delta)
        out = bc.call(
            b, member, b.linear_backward, g, x_sel, w, d, idx, need_input_grad, need_delta_grad
        )
    grad_x, grad_delta = bc.check_pair(b, member, out)
    lead = tuple(g.shape[:-1])
    if need_input_grad:
        bc.check_tensor(b, member, "grad_x", grad_x, (*lead, weight.shape[1]), dtype)
    if need_delta_grad:
        bc.check_tensor(b, member, "grad_delta", grad_delta, tuple(d.shape), d.dtype)
    return grad_x, grad_delta


def _bias_grad(grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(dtype)


def _save(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    x_sel: torch.Tensor,
    key: str,
) -> None:
    """Save what backward needs: only ``x_sel`` of the activations."""
    ctx.save_for_backward(x_sel, weight, delta, idx)
    ctx.backend_key = key
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grads(ctx: Any, grad_out: torch.Tensor, as_ops: bool) -> tuple[torch.Tensor | None, ...]:
    """``(grad_x, grad_bias, grad_delta)``; through the custom op when ``as_ops``."""
    x_sel, weight, delta, idx = ctx.saved_tensors
    key = ctx.backend_key
    b = backend_for_key(key)
    need_x, need_delta = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[3])
    grad_x = grad_delta = None
    if need_x or need_delta:
        if as_ops:
            gx, gd = _backward_op(grad_out, x_sel, weight, delta, idx, key, need_x, need_delta)
            grad_x = gx if need_x else None
            grad_delta = gd if need_delta else None
        else:
            grad_x, grad_delta = _backward_impl(
                grad_out, x_sel, weight, delta, idx, b, need_x, need_delta
            )
    if grad_x is not None:
        grad_x = grad_x.to(ctx.x_dtype)
    if grad_delta is not None:
        grad_delta = grad_delta.to(delta.dtype)
    grad_bias = _bias_grad(grad_out, ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    queue_backward_end(b)
    return grad_x, grad_bias, grad_delta


# ------------------------------------------------------------------ graph mode: custom ops
@torch.library.custom_op("paca::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: str,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W_eff^T + b, x[..., idx])``, both in the compute dtype."""
    return _forward_impl(x, weight, bias, delta, idx, backend_for_key(backend), compute_dtype)


@_linear_op.register_fake
def _linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: str,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if compute_dtype is None and x.dtype != weight.dtype:
        raise _dtype_error(x, weight)
    dtype = compute_dtype if compute_dtype is not None else x.dtype
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, weight.shape[0]), dtype=dtype),
        x.new_empty((*lead, idx.shape[0]), dtype=dtype),
    )


@torch.library.custom_op("paca::linear_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x_sel: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: str,
    need_input_grad: bool,
    need_delta_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dX, d(delta))``; an empty tensor stands for a gradient not asked for."""
    gx, gd = _backward_impl(
        grad_out,
        x_sel,
        weight,
        delta,
        idx,
        backend_for_key(backend),
        need_input_grad,
        need_delta_grad,
    )
    empty = grad_out.new_empty(0)
    return (gx if gx is not None else empty), (gd if gd is not None else delta.new_empty(0))


@_backward_op.register_fake
def _backward_fake(
    grad_out: torch.Tensor,
    x_sel: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: str,
    need_input_grad: bool,
    need_delta_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gx_shape = (*grad_out.shape[:-1], weight.shape[1]) if need_input_grad else (0,)
    gd_shape = tuple(delta.shape) if need_delta_grad else (0,)
    return grad_out.new_empty(gx_shape, dtype=x_sel.dtype), delta.new_empty(gd_shape)


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, delta, idx, key, _compute = inputs
    _save(ctx, x, weight, bias, delta, idx, output[1], key)


def _op_backward(
    ctx: Any, grad_out: torch.Tensor, _grad_x_sel: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    grad_x, grad_bias, grad_delta = _grads(ctx, grad_out, as_ops=True)
    return grad_x, None, grad_bias, grad_delta, None, None, None


_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------ eager mode
class PacaLinearFunction(torch.autograd.Function):
    """Eager ``y = x @ W_eff^T + b`` saving only ``x[..., idx]`` (same math as the op)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
        key: str,
        compute_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        b = backend_for_key(key)
        y, x_sel = _forward_impl(x, weight, bias, delta, idx, b, compute_dtype)
        _save(ctx, x, weight, bias, delta, idx, x_sel, key)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_x, grad_bias, grad_delta = _grads(ctx, grad_out, as_ops=False)
        return grad_x, None, grad_bias, grad_delta, None, None, None


# ------------------------------------------------------------------ public entry point
def paca_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    backend: Backend,
) -> torch.Tensor:
    """PaCA linear: ``x @ W_eff^T + bias`` saving only ``x[..., idx]`` for backward.

    Under ``torch.autocast`` the op computes in the autocast dtype (input, weight and
    bias cast once, the cast input's selected channels saved); ``delta``'s gradient is
    always accumulated in fp32 and returned in ``delta.dtype``. ``weight`` is bit-exact
    whenever no PaCA op is running (the built-in backends write the r trained columns
    only for the duration of a GEMM).
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(BASE_WEIGHT_GRAD_MESSAGE)
    key = backend_key(backend)
    compute = autocast_dtype(x.device.type)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias, delta, idx, key, compute)[0]
    return PacaLinearFunction.apply(x, weight, bias, delta, idx, key, compute)
