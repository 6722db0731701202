"""The PaCA linear operation: one implementation, an eager autograd path and a custom op.

Forward is a single GEMM with the effective weight (W with ``W[:, idx] + delta`` in
the trained columns). Backward gives ``dX = dY @ W_eff`` and
``d(delta) = dY^T @ x[..., idx]`` accumulated in fp32. Only ``x[..., idx]`` (r of
the ``in`` input channels) is saved, never the whole input; W, delta and idx are
parameters/buffers that exist anyway. Every device-specific step goes through the
backend, so this file is the same on every device.

Graph mode: the op is registered with ``torch.library`` as three custom ops,
``paca::linear`` (forward; returns the output and the saved ``x[..., idx]``),
``paca::linear_input_grad`` and ``paca::linear_delta_grad``, with fake implementations
and an autograd formula. ``torch.compile`` therefore sees one opaque node per PaCA layer:
it never traces into backend code (Triton launches, SDK calls), never graph-breaks at a
PaCA layer, and never functionalizes a column write into a weight copy. Custom ops take
tensors and plain values only, so the backend travels as a string key from
:func:`backend_key`.

Eager mode takes a plain ``autograd.Function`` around the *same* implementation
functions, because dispatching three custom ops costs about twice the host time of the
whole eager op on small layers; :func:`paca_linear` picks the custom op whenever
``torch.compile`` is tracing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from paca import weight_cache
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


def _no_autocast(device_type: str) -> Any:
    """Switch autocast off inside the op (its casts are done explicitly, once)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return contextlib.nullcontext()


# ------------------------------------------------------------------ the math, once
def _forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    w_eff: torch.Tensor | None,
    b: Backend,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W_eff^T + b, x[..., idx])``, both in the compute dtype."""
    with _no_autocast(x.device.type):
        w = w_eff if w_eff is not None else b.effective_weight(weight, idx, delta)
        if compute_dtype is not None:  # autocast's casts, done once here
            x = x.to(compute_dtype)
            w = w.to(compute_dtype)
            bias = bias.to(compute_dtype) if bias is not None else None
        y = b.linear(x, w, bias)
        x_sel = b.gather(x, idx, dim=-1)
    return y, x_sel


def _input_grad_impl(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    w_eff: torch.Tensor | None,
    b: Backend,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dX = dY @ W_eff`` (W_eff rebuilt here unless cached: saving it would cost a copy)."""
    with _no_autocast(grad_out.device.type):
        w = w_eff if w_eff is not None else b.effective_weight(weight, idx, delta)
        return b.input_grad(grad_out, w.to(grad_out.dtype)).to(out_dtype)


def _delta_grad_impl(
    grad_out: torch.Tensor, x_sel: torch.Tensor, b: Backend, out_dtype: torch.dtype
) -> torch.Tensor:
    """``d(delta) = dY^T @ x[..., idx]`` over all leading dims, accumulated in fp32."""
    flat_g = grad_out.reshape(-1, grad_out.shape[-1])
    flat_x = x_sel.reshape(-1, x_sel.shape[-1])
    with _no_autocast(grad_out.device.type):
        if flat_g.dtype != flat_x.dtype:  # e.g. an fp32 loss gradient reaching a bf16 op
            flat_g = flat_g.to(flat_x.dtype)
        return b.delta_grad(flat_g, flat_x).to(out_dtype)


def _save(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    w_eff: torch.Tensor | None,
    x_sel: torch.Tensor,
    key: str,
) -> None:
    """Save what backward needs: only ``x_sel`` of the activations."""
    ctx.save_for_backward(x_sel, weight, delta, idx)
    # A cached effective weight is a persistent buffer, not an activation: keep it off the
    # saved-tensor list (so it is not counted or offloaded) and check its version ourselves.
    ctx.w_eff = w_eff
    ctx.w_eff_version = w_eff._version if w_eff is not None else None
    ctx.backend_key = key
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grads(ctx: Any, grad_out: torch.Tensor, as_ops: bool) -> tuple[torch.Tensor | None, ...]:
    """``(grad_x, grad_bias, grad_delta)``; through the custom ops when ``as_ops``."""
    x_sel, weight, delta, idx = ctx.saved_tensors
    w_eff = ctx.w_eff
    if w_eff is not None and w_eff._version != ctx.w_eff_version:
        raise RuntimeError(
            "a PaCA layer's delta was changed between forward and backward (the cached "
            "effective weight was rewritten); run backward before optimizer.step()"
        )
    key = ctx.backend_key
    b = backend_for_key(key)
    grad_x = grad_bias = grad_delta = None
    if ctx.needs_input_grad[0]:
        if as_ops:
            grad_x = _input_grad_op(grad_out, weight, delta, idx, w_eff, key, ctx.x_dtype)
        else:
            grad_x = _input_grad_impl(grad_out, weight, delta, idx, w_eff, b, ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        if as_ops:
            grad_delta = _delta_grad_op(grad_out, x_sel, key, delta.dtype)
        else:
            grad_delta = _delta_grad_impl(grad_out, x_sel, b, delta.dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
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
    w_eff: torch.Tensor | None,
    backend: str,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W_eff^T + b, x[..., idx])``, both in the compute dtype."""
    return _forward_impl(
        x, weight, bias, delta, idx, w_eff, backend_for_key(backend), compute_dtype
    )


@_linear_op.register_fake
def _linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    idx: torch.Tensor,
    w_eff: torch.Tensor | None,
    backend: str,
    compute_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if compute_dtype is None and x.dtype != weight.dtype:
        raise RuntimeError(
            f"PaCA linear: input dtype {x.dtype} != weight dtype {weight.dtype}; cast the input "
            f"or run under torch.autocast"
        )
    dtype = compute_dtype if compute_dtype is not None else x.dtype
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, weight.shape[0]), dtype=dtype),
        x.new_empty((*lead, idx.shape[0]), dtype=dtype),
    )


@torch.library.custom_op("paca::linear_input_grad", mutates_args=())
def _input_grad_op(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    w_eff: torch.Tensor | None,
    backend: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``dX = dY @ W_eff``."""
    return _input_grad_impl(
        grad_out, weight, delta, idx, w_eff, backend_for_key(backend), out_dtype
    )


@_input_grad_op.register_fake
def _input_grad_fake(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    idx: torch.Tensor,
    w_eff: torch.Tensor | None,
    backend: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("paca::linear_delta_grad", mutates_args=())
def _delta_grad_op(
    grad_out: torch.Tensor, x_sel: torch.Tensor, backend: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """``d(delta) = dY^T @ x[..., idx]``, accumulated in fp32."""
    return _delta_grad_impl(grad_out, x_sel, backend_for_key(backend), out_dtype)


@_delta_grad_op.register_fake
def _delta_grad_fake(
    grad_out: torch.Tensor, x_sel: torch.Tensor, backend: str, out_dtype: torch.dtype
) -> torch.Tensor:
    return grad_out.new_empty((grad_out.shape[-1], x_sel.shape[-1]), dtype=out_dtype)


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, delta, idx, w_eff, key, _compute = inputs
    _save(ctx, x, weight, bias, delta, idx, w_eff, output[1], key)


def _op_backward(
    ctx: Any, grad_out: torch.Tensor, _grad_x_sel: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    grad_x, grad_bias, grad_delta = _grads(ctx, grad_out, as_ops=True)
    return grad_x, None, grad_bias, grad_delta, None, None, None, None


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
        w_eff: torch.Tensor | None,
        key: str,
        compute_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        b = backend_for_key(key)
        y, x_sel = _forward_impl(x, weight, bias, delta, idx, w_eff, b, compute_dtype)
        _save(ctx, x, weight, bias, delta, idx, w_eff, x_sel, key)
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_x, grad_bias, grad_delta = _grads(ctx, grad_out, as_ops=False)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None


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

    Under ``torch.autocast`` the op computes in the autocast dtype (input, effective
    weight and bias cast once, the cast input's selected channels saved); ``delta``'s
    gradient is always accumulated in fp32 and returned in ``delta.dtype``. When the
    effective-weight cache is on (:mod:`paca.weight_cache`) the columns are written
    once per optimizer step instead of once per call.
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(BASE_WEIGHT_GRAD_MESSAGE)
    key = backend_key(backend)
    compute = autocast_dtype(x.device.type)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias, delta, idx, None, key, compute)[0]
    w_eff = weight_cache.lookup(backend, weight, delta, idx, compute)
    return PacaLinearFunction.apply(x, weight, bias, delta, idx, w_eff, key, compute)
