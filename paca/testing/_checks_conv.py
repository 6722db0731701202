"""Contract items for the 2-D convolution primitives and the PaCA conv op.

The conv primitives have working plain-torch defaults in the Backend ABC, so a backend
that does not override them passes trivially; one that does is checked here against
the CPU reference and exact fp64 gradients, for two geometries (padded stride 1, and
stride 2 with dilation 2, which exercises the output-size arithmetic).
"""

from __future__ import annotations

import torch

from paca.testing._checks_primitives import _per_dtype
from paca.testing._contract import (
    CheckContext,
    ContractViolation,
    calling,
    dtype_name,
    expect_close,
    expect_device,
    expect_dtype,
)

C_OUT, C_IN, R, K = 6, 10, 3, 3
#: Smallest tolerance for fp32 convolutions: cuDNN computes them in TF32 by default
#: (``torch.backends.cudnn.allow_tf32``), which torch users expect, unlike TF32 GEMMs.
CONV_FP32_TOLERANCE = 5e-3


def _tol(ctx: CheckContext, dtype: torch.dtype) -> float:
    tol = ctx.tol(dtype)
    return max(tol, CONV_FP32_TOLERANCE) if dtype == torch.float32 else tol


GEOMETRIES = {
    "stride 1, padding 1": ((1, 1), (1, 1), (1, 1)),
    "stride 2, dilation 2": ((2, 2), (0, 0), (2, 2)),
}


def _tensors(ctx: CheckContext, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "x": ctx.randn(2, C_IN, 9, 9, dtype=dtype),
        "weight": (ctx.randn(C_OUT, C_IN, K, K, salt=1) * (C_IN * K * K) ** -0.5).to(dtype),
        "bias": ctx.randn(C_OUT, dtype=dtype, salt=2),
        "delta": (ctx.randn(C_OUT, R, K, K, salt=3) * 0.05).to(dtype),
        "idx": ctx.columns(C_IN, R, salt=4),
    }


@_per_dtype("conv2d", "conv2d primitive matches the CPU reference")
def check_conv2d(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    t = _tensors(ctx, dtype)
    worst = 0.0
    for label, geo in GEOMETRIES.items():
        what = f"conv2d ({label})"
        with calling(what):
            got = ctx.backend.conv2d(
                ctx.on_device(t["x"]), ctx.on_device(t["weight"]), ctx.on_device(t["bias"]), *geo
            )
        expect_device(what, got, ctx.device)
        expect_dtype(what, got, dtype)
        want = ctx.reference.conv2d(t["x"], t["weight"], t["bias"], *geo)
        worst = max(worst, expect_close(what, got, want, _tol(ctx, dtype), dtype_name(dtype)))
    return f"max relative error {worst:.2g}"


@_per_dtype("conv2d_input_grad", "conv2d_input_grad matches the CPU reference")
def check_conv2d_input_grad(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    t = _tensors(ctx, dtype)
    worst = 0.0
    for label, geo in GEOMETRIES.items():
        y = ctx.reference.conv2d(t["x"], t["weight"], None, *geo)
        g = ctx.randn(*y.shape, dtype=dtype, salt=9)
        shape = tuple(t["x"].shape)
        what = f"conv2d_input_grad ({label})"
        with calling(what):
            got = ctx.backend.conv2d_input_grad(
                ctx.on_device(g), ctx.on_device(t["weight"]), shape, *geo
            )
        expect_device(what, got, ctx.device)
        want = ctx.reference.conv2d_input_grad(g, t["weight"], shape, *geo)
        worst = max(worst, expect_close(what, got, want, _tol(ctx, dtype), dtype_name(dtype)))
    return f"max relative error {worst:.2g}"


@_per_dtype(
    "conv2d_delta_grad",
    "conv2d_delta_grad = dense kernel gradient's selected channels, fp32-accumulated",
)
def check_conv2d_delta_grad(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    t = _tensors(ctx, dtype)
    x_sel = t["x"].index_select(1, t["idx"])
    worst = 0.0
    for label, geo in GEOMETRIES.items():
        y = ctx.reference.conv2d(t["x"], t["weight"], None, *geo)
        g = ctx.randn(*y.shape, dtype=dtype, salt=9)
        shape = tuple(t["delta"].shape)
        what = f"conv2d_delta_grad ({label})"
        with calling(what):
            got = ctx.backend.conv2d_delta_grad(ctx.on_device(g), ctx.on_device(x_sel), shape, *geo)
        expect_device(what, got, ctx.device)
        expect_dtype(what, got, torch.float32)
        dense = torch.nn.grad.conv2d_weight(
            t["x"].double(), tuple(t["weight"].shape), g.double(), *geo
        ).index_select(1, t["idx"])
        worst = max(
            worst,
            expect_close(
                what + " vs dense dW[:, idx]", got, dense, _tol(ctx, torch.float32), "fp32"
            ),
        )
    return f"max relative error {worst:.2g} vs fp64"


@_per_dtype("op_conv2d", "PaCA conv op: forward, input and delta gradients match the CPU reference")
def check_op_conv2d(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    from paca.ops_conv import paca_conv2d

    t = _tensors(ctx, dtype)
    geo = GEOMETRIES["stride 1, padding 1"]

    def run(backend, device: torch.device):
        x = t["x"].detach().to(device, copy=True).requires_grad_(True)
        delta = t["delta"].detach().to(device, copy=True).requires_grad_(True)
        args = [t[k].detach().to(device, copy=True) for k in ("weight", "bias", "idx")]
        y = paca_conv2d(x, args[0], args[1], delta, args[2], backend, *geo)
        y.square().sum().backward()
        return y.detach(), x.grad, delta.grad

    got = run(ctx.backend, ctx.device)
    want = run(ctx.reference, torch.device("cpu"))
    tol = _tol(ctx, dtype)
    for label, a, b in zip(("output", "input gradient", "delta gradient"), got, want, strict=True):
        if a is None:
            raise ContractViolation(f"PaCA conv op: {label} is None")
        expect_close(f"PaCA conv op {label}", a, b, tol, dtype_name(dtype))
    return None
