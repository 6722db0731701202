"""Contract items for the PaCA op and layer as users run them on the backend.

These drive :func:`paca.ops.paca_linear` and :class:`paca.layer.PacaLinear` end to
end, so they also catch primitives that are individually right but combine wrongly
(e.g. a gather that returns a view of the whole input, which keeps it alive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paca.ops import paca_linear
from paca.testing._checks_primitives import IN, OUT, R, _per_dtype
from paca.testing._contract import (
    CheckContext,
    ContractSkip,
    ContractViolation,
    contract_item,
    dtype_name,
    expect_close,
    expect_device,
    expect_dtype,
    expect_exact,
)


@dataclass
class _OpRun:
    y: torch.Tensor
    dx: torch.Tensor
    ddelta: torch.Tensor
    dbias: torch.Tensor


def _inputs(ctx: CheckContext, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "x": ctx.randn(3, 5, IN, dtype=dtype),
        "weight": (ctx.randn(OUT, IN, salt=1) * IN**-0.5).to(dtype),
        "bias": ctx.randn(OUT, dtype=dtype, salt=2),
        "delta": (ctx.randn(OUT, R, salt=3) * 0.05).to(dtype),
        "idx": ctx.columns(IN, R, salt=4),
        "grad": ctx.randn(3, 5, OUT, dtype=dtype, salt=5),
    }


def _run_op(backend, t: dict[str, torch.Tensor], device: torch.device | None) -> _OpRun:
    def mv(v: torch.Tensor) -> torch.Tensor:
        return v.detach().to(device or "cpu", copy=True)

    x = mv(t["x"]).requires_grad_(True)
    bias = mv(t["bias"]).requires_grad_(True)
    delta = mv(t["delta"]).requires_grad_(True)
    y = paca_linear(x, mv(t["weight"]), bias, delta, mv(t["idx"]), backend)
    y.backward(mv(t["grad"]))
    return _OpRun(y.detach(), x.grad, delta.grad, bias.grad)


def _both(ctx: CheckContext, dtype: torch.dtype) -> tuple[dict, _OpRun, _OpRun]:
    ctx.require_dtype(dtype)
    t = _inputs(ctx, dtype)
    return t, _run_op(ctx.backend, t, ctx.device), _run_op(ctx.reference, t, None)


@_per_dtype("op_forward", "PaCA op forward matches the CPU reference")
def check_op_forward(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    _, got, want = _both(ctx, dtype)
    expect_device("op forward", got.y, ctx.device)
    expect_dtype("op forward", got.y, dtype)
    err = expect_close("op forward", got.y, want.y, ctx.tol(dtype), dtype_name(dtype))
    return f"max relative error {err:.2g}"


@_per_dtype("op_input_grad", "PaCA op input gradient dX = dY @ W_eff matches the CPU reference")
def check_op_input_grad(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    _, got, want = _both(ctx, dtype)
    if got.dx is None:
        raise ContractViolation("op input gradient: x.grad is None after backward")
    expect_dtype("op input gradient", got.dx, dtype)
    err = expect_close("op input gradient", got.dx, want.dx, ctx.tol(dtype), dtype_name(dtype))
    return f"max relative error {err:.2g}"


@_per_dtype(
    "op_delta_grad",
    "PaCA op delta gradient matches the CPU reference and the dense weight-gradient columns",
)
def check_op_delta_grad(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    t, got, want = _both(ctx, dtype)
    if got.ddelta is None:
        raise ContractViolation("op delta gradient: delta.grad is None after backward")
    tol = ctx.tol(dtype)
    expect_dtype("op delta gradient", got.ddelta, dtype)
    err = expect_close(
        "op delta gradient vs the CPU reference", got.ddelta, want.ddelta, tol, dtype_name(dtype)
    )
    # The dense gradient of the effective weight, restricted to the trained columns.
    x = t["x"].double().reshape(-1, IN)
    g = t["grad"].double().reshape(-1, OUT)
    dense = g.t().mm(x)
    expect_close(
        "op delta gradient vs dense dW[:, idx]",
        got.ddelta,
        dense.index_select(1, t["idx"]),
        tol,
        dtype_name(dtype),
    )
    expect_close("op bias gradient", got.dbias, g.sum(0), tol, dtype_name(dtype))
    return f"max relative error {err:.2g}"


def _storage_key(t: torch.Tensor) -> object:
    """Identifies the memory a tensor keeps alive. Devices whose tensors report no data
    pointer (lazy-mode HPU tensors) are keyed by shape and dtype instead, which tells the
    saved ``x[..., idx]`` apart from the weight, delta, idx and bias in this check."""
    ptr = t.untyped_storage().data_ptr()
    return ptr if ptr else ("no-pointer", tuple(t.shape), t.dtype)


def _storage_bytes(t: torch.Tensor) -> tuple[object, int]:
    nbytes = t.untyped_storage().nbytes() if t.untyped_storage().data_ptr() else 0
    return _storage_key(t), nbytes or t.numel() * t.element_size()


@_per_dtype(
    "saved_activations", "PaCA op saves only x[..., idx]: r/in of the input's bytes for backward"
)
def check_saved_activations(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    t = _inputs(ctx, dtype)
    dev = {k: ctx.on_device(v) for k, v in t.items()}
    x = dev["x"].requires_grad_(True)
    delta = dev["delta"].requires_grad_(True)
    owned = {_storage_key(v) for k, v in dev.items() if k not in ("x", "grad")}
    owned.add(_storage_key(delta))
    saved: list[torch.Tensor] = []

    def pack(v: torch.Tensor) -> torch.Tensor:
        if _storage_key(v) not in owned:  # parameters/buffers exist anyway
            saved.append(v)
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        y = paca_linear(x, dev["weight"], dev["bias"], delta, dev["idx"], ctx.backend)
    # Whole storages count: a small view into a copy of x keeps all of x alive.
    got = sum(dict(_storage_bytes(v) for v in saved).values())
    want = x.numel() // IN * R * x.element_size()
    if got != want:
        shapes = ", ".join(f"{tuple(v.shape)} {v.dtype}" for v in saved) or "nothing"
        raise ContractViolation(
            f"saved activations: {got} bytes of storage saved for backward ({shapes}), "
            f"expected {want} bytes = r/in ({R}/{IN}) of the input; gather() must return a "
            f"tensor of its own, not a view into a larger one"
        )
    y.backward(dev["grad"])  # the saved tensors must be usable
    return f"{got} bytes = {R}/{IN} of the input"


def _linear(weight: torch.Tensor, bias: torch.Tensor, device: torch.device) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.to(device).requires_grad_(False)


@_per_dtype("merge_unmerge", "merge writes W + delta into W's columns; unmerge restores W exactly")
def check_merge_unmerge(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    from paca.layer import PacaLinear

    t = _inputs(ctx, dtype)
    base = _linear(t["weight"], t["bias"], ctx.device)
    original = base.weight.detach().clone()
    layer = PacaLinear(base, ctx.backend)
    layer.add_adapter("default", ctx.on_device(t["idx"]), None)
    with torch.no_grad():
        layer.paca_delta["default"].copy_(ctx.on_device(t["delta"]))
    x = ctx.on_device(t["x"])
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge("default")
        merged_weight = base.weight.detach().clone()
        merged = layer(x)
        layer.unmerge()
    expect_exact(
        "merge: merged weight vs CPU effective_weight",
        merged_weight,
        ctx.reference.effective_weight(t["weight"], t["idx"], t["delta"]),
    )
    expect_close(
        "merge: output after merge vs before", merged, unmerged, ctx.tol(dtype), dtype_name(dtype)
    )
    expect_exact("unmerge: weight after merge + unmerge vs original", base.weight, original)
    return None


@contract_item("autocast", "PaCA op under torch.autocast computes in the autocast dtype")
def check_autocast(ctx: CheckContext) -> str | None:
    if "autocast" not in ctx.backend.capabilities:
        raise ContractSkip("backend does not declare the 'autocast' capability")
    low = next(
        (d for d in (torch.bfloat16, torch.float16) if dtype_name(d) in ctx.backend.capabilities),
        None,
    )
    if low is None:
        raise ContractSkip("'autocast' declared without 'bfloat16' or 'float16'")
    t = _inputs(ctx, torch.float32)
    x = ctx.on_device(t["x"]).requires_grad_(True)
    delta = ctx.on_device(t["delta"]).requires_grad_(True)
    args = (ctx.on_device(t["weight"]), ctx.on_device(t["bias"]))
    with torch.autocast(device_type=ctx.device.type, dtype=low):
        y = paca_linear(x, args[0], args[1], delta, ctx.on_device(t["idx"]), ctx.backend)
    expect_dtype("autocast forward", y, low)
    y.float().backward(ctx.on_device(t["grad"]))
    expect_dtype("autocast input gradient", x.grad, torch.float32)
    expect_dtype("autocast delta gradient", delta.grad, torch.float32)
    want = _run_op(ctx.reference, t, None)
    expect_close("autocast forward vs fp32 reference", y, want.y, ctx.tol(low), dtype_name(low))
    expect_close(
        "autocast delta gradient vs fp32 reference",
        delta.grad,
        want.ddelta,
        ctx.tol(low),
        dtype_name(low),
    )
    return f"computed in {dtype_name(low)}"
