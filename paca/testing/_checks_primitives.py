"""Contract items for the compute primitives, each compared with the CPU reference.

Sizes are small (the whole suite must stay cheap on 2 CPU cores) but not trivial:
unsorted column indices, 2-D, 3-D and conv-shaped (4-D) tensors, and 512-row
reductions, so that a bf16-accumulating ``delta_grad`` is caught.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from paca.testing._contract import (
    CheckContext,
    ContractViolation,
    calling,
    contract_item,
    dtype_name,
    expect_close,
    expect_device,
    expect_dtype,
    expect_exact,
)

OUT, IN, R = 24, 40, 6
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


DtypeCheck = Callable[[CheckContext, torch.dtype], "str | None"]


def _per_dtype(item: str, title: str) -> Callable[[DtypeCheck], DtypeCheck]:
    """Register one contract item per dtype, e.g. ``gather[bfloat16]``; each skips unless
    the backend declares that dtype's capability."""

    def deco(check: DtypeCheck) -> DtypeCheck:
        for dtype in DTYPES:

            def bound(ctx: CheckContext, _dtype: torch.dtype = dtype) -> str | None:
                ctx.require_dtype(_dtype)
                return check(ctx, _dtype)

            bound.__doc__ = check.__doc__
            contract_item(f"{item}[{dtype_name(dtype)}]", f"{title} ({dtype_name(dtype)})")(bound)
        return check

    return deco


@_per_dtype("gather", "gather returns x.index_select(dim, idx), contiguous, exact")
def check_gather(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    b = ctx.backend
    idx = ctx.columns(IN, R)
    cases = [
        ("3-D input, dim=-1", ctx.randn(3, 5, IN, dtype=dtype), -1),
        ("2-D input, dim=-1", ctx.randn(7, IN, dtype=dtype, salt=1), -1),
        ("4-D NCHW input, dim=1", ctx.randn(2, IN, 3, 3, dtype=dtype, salt=2), 1),
    ]
    for label, x, dim in cases:
        what = f"gather ({label})"
        with calling(what):
            out = b.gather(ctx.on_device(x), ctx.on_device(idx), dim=dim)
        expect_device(what, out, ctx.device)
        if not out.is_contiguous():
            raise ContractViolation(f"{what}: result is not contiguous (it is saved for backward)")
        expect_exact(what, out, x.index_select(dim, idx))
    return None


@_per_dtype(
    "effective_weight",
    "effective_weight = W with W[:, idx] + delta (fp32, rounded once), W not mutated",
)
def check_effective_weight(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    b, ref = ctx.backend, ctx.reference
    idx = ctx.columns(IN, R)
    cases = [
        ("delta in the weight dtype", (OUT, IN), (OUT, R), dtype),
        ("fp32 delta", (OUT, IN), (OUT, R), torch.float32),
        ("conv kernel (out, in, 3, 3)", (OUT, IN, 3, 3), (OUT, R, 3, 3), dtype),
    ]
    for n, (label, w_shape, d_shape, d_dtype) in enumerate(cases):
        w = ctx.randn(*w_shape, dtype=dtype, salt=10 + n)
        delta = (ctx.randn(*d_shape, salt=20 + n) * 0.01).to(d_dtype)
        w_dev = ctx.on_device(w)
        before = w_dev.detach().clone()
        what = f"effective_weight ({label})"
        with calling(what):
            out = b.effective_weight(w_dev, ctx.on_device(idx), ctx.on_device(delta))
        expect_device(what, out, ctx.device)
        expect_dtype(what, out, w.dtype)
        if out is w_dev or (w_dev.data_ptr() != 0 and out.data_ptr() == w_dev.data_ptr()):
            raise ContractViolation(f"{what}: returned the weight itself; it must be a new tensor")
        expect_exact(f"{what}: the weight W after the call (must not be modified)", w_dev, before)
        expect_exact(what, out, ref.effective_weight(w, idx, delta))
    return None


@_per_dtype("linear", "linear = x @ W.T + b (forward GEMM) matches the CPU reference")
def check_linear(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    b, ref, tol = ctx.backend, ctx.reference, ctx.tol(dtype)
    w = ctx.randn(OUT, IN, dtype=dtype) * (IN**-0.5)
    bias = ctx.randn(OUT, dtype=dtype, salt=1)
    worst = 0.0
    for label, x, bb in [
        ("3-D input with bias", ctx.randn(3, 5, IN, dtype=dtype, salt=2), bias),
        ("2-D input without bias", ctx.randn(7, IN, dtype=dtype, salt=3), None),
    ]:
        what = f"linear ({label})"
        with calling(what):
            out = b.linear(
                ctx.on_device(x), ctx.on_device(w), None if bb is None else ctx.on_device(bb)
            )
        expect_device(what, out, ctx.device)
        expect_dtype(what, out, dtype)
        worst = max(worst, expect_close(what, out, ref.linear(x, w, bb), tol, dtype_name(dtype)))
    return f"max relative error {worst:.2g} (tolerance {tol:g})"


@_per_dtype("input_grad", "input_grad = dY @ W matches the CPU reference")
def check_input_grad(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    b, ref, tol = ctx.backend, ctx.reference, ctx.tol(dtype)
    w = ctx.randn(OUT, IN, dtype=dtype) * (OUT**-0.5)
    worst = 0.0
    for label, g in [
        ("3-D grad_out", ctx.randn(3, 5, OUT, dtype=dtype, salt=1)),
        ("2-D grad_out", ctx.randn(7, OUT, dtype=dtype, salt=2)),
    ]:
        what = f"input_grad ({label})"
        with calling(what):
            out = b.input_grad(ctx.on_device(g), ctx.on_device(w))
        expect_device(what, out, ctx.device)
        expect_dtype(what, out, dtype)
        worst = max(worst, expect_close(what, out, ref.input_grad(g, w), tol, dtype_name(dtype)))
    return f"max relative error {worst:.2g} (tolerance {tol:g})"


@_per_dtype("delta_grad", "delta_grad = dY.T @ x_sel accumulated and returned in fp32")
def check_delta_grad(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    b, ref = ctx.backend, ctx.reference
    tol = ctx.tol(torch.float32)  # fp32 accumulation is the promise, whatever the inputs
    n = 512  # long enough that accumulating in bf16/fp16 misses the fp32 tolerance
    g = ctx.randn(n, OUT, dtype=dtype, salt=1)
    xs = ctx.randn(n, R, dtype=dtype, salt=2)
    out = b.delta_grad(ctx.on_device(g), ctx.on_device(xs))
    what = f"delta_grad ({n} rows of {dtype_name(dtype)})"
    expect_device(what, out, ctx.device)
    expect_dtype(what, out, torch.float32)
    truth = g.double().t().mm(xs.double())
    err = expect_close(what + " vs exact fp64", out, truth, tol, "fp32 accumulation")
    expect_close(what + " vs the CPU reference", out, ref.delta_grad(g, xs), tol, "fp32")
    return f"max relative error {err:.2g} vs fp64 (tolerance {tol:g})"


@_per_dtype("write_columns", "write_columns writes W[:, idx] = columns in place, exactly")
def check_write_columns(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    b = ctx.backend
    idx = ctx.columns(IN, R)
    for n, (label, w_shape, c_shape) in enumerate(
        [("2-D weight", (OUT, IN), (OUT, R)), ("conv kernel", (OUT, IN, 3, 3), (OUT, R, 3, 3))]
    ):
        w = ctx.randn(*w_shape, dtype=dtype, salt=n)
        cols = ctx.randn(*c_shape, salt=10 + n)  # fp32: the backend rounds once to W's dtype
        w_dev = ctx.on_device(w)
        ptr = w_dev.data_ptr()
        what = f"write_columns ({label})"
        with calling(what):
            ret = b.write_columns(w_dev, ctx.on_device(idx), ctx.on_device(cols))
        if ret is not None:
            raise ContractViolation(f"{what}: returned {type(ret).__name__}; it writes in place")
        if w_dev.data_ptr() != ptr:
            raise ContractViolation(f"{what}: the weight's storage changed; write in place")
        expected = w.clone()
        expected.index_copy_(1, idx, cols.to(dtype))
        expect_exact(what, w_dev, expected)
    return None
