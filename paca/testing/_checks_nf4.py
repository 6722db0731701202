"""Contract item for the ``"nf4"`` capability: PaCA on a 4-bit NF4 frozen base (QPaCA).

Drives :func:`paca.ops_quant.paca_linear_4bit` (so the backend's
``quantized_linear_forward`` / ``quantized_linear_backward``) on a bitsandbytes-quantized
weight and checks it against dense autograd on the dequantized weight: output, input
gradient and the delta gradient (= the selected columns of the dense weight gradient),
for plain and double-quantized scales. The packed weight must be bit-exact afterwards,
and autograd may keep only ``x[..., idx]`` of the activations.
"""

from __future__ import annotations

import torch

from paca.testing._contract import (
    CheckContext,
    ContractSkip,
    ContractViolation,
    contract_item,
    expect_close,
)

#: Layer shape of the check: ``in`` spans two 64-element quantization blocks per row.
IN, OUT, R = 128, 48, 8


@contract_item("nf4", "capability 'nf4': PaCA on a 4-bit NF4 base matches the dequantized model")
def check_nf4(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if "nf4" not in b.capabilities:
        raise ContractSkip("backend does not declare the 'nf4' capability")
    problem = b.capability_problem("nf4") if hasattr(b, "capability_problem") else None
    if problem:
        raise ContractSkip(f"'nf4' is declared but cannot run here: {problem}")
    import bitsandbytes.functional as bnbf

    from paca.ops_quant import nf4_dequantize, paca_linear_4bit

    notes = []
    for nested in (False, True):
        w = ctx.on_device(ctx.randn(OUT, IN, salt=11) * IN**-0.5)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, compress_statistics=nested, quant_type="nf4"
        )
        before = packed.clone()
        dense = nf4_dequantize(packed, state).detach().to("cpu", torch.float64)
        bias = ctx.randn(OUT, salt=12)
        delta0 = ctx.randn(OUT, R, salt=13) * 0.05
        idx = ctx.columns(IN, R, salt=14)
        x0 = ctx.randn(3, 5, IN, salt=15)
        g0 = ctx.randn(3, 5, OUT, salt=16)

        x = ctx.on_device(x0).requires_grad_(True)
        delta = ctx.on_device(delta0).requires_grad_(True)
        saved: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor, saved: list = saved, delta: torch.Tensor = delta) -> torch.Tensor:
            if t is not delta:
                saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = paca_linear_4bit(
                x, packed, state, ctx.on_device(bias), delta, ctx.on_device(idx), b, None
            )
        y.backward(ctx.on_device(g0))

        wr = dense.clone()
        wr[:, idx] += delta0.double()
        wr.requires_grad_(True)
        xr = x0.double().requires_grad_(True)
        yr = xr @ wr.t() + bias.double()
        yr.backward(g0.double())

        kind = "double-quantized" if nested else "plain"
        tol = ctx.tol(torch.float32)
        expect_close(f"{kind} NF4 output", y, yr, tol)
        expect_close(f"{kind} NF4 input gradient", x.grad, xr.grad, tol)
        expect_close(f"{kind} NF4 delta gradient", delta.grad, wr.grad[:, idx], tol)
        if not torch.equal(packed, before):
            raise ContractViolation(f"{kind} NF4: the packed 4-bit weight was modified")
        activations = [s for s in saved if s not in {(R,), tuple(idx.shape)}]
        if activations != [(3, 5, R)]:
            raise ContractViolation(
                f"{kind} NF4: autograd saved tensors of shapes {activations}, expected only "
                f"x[..., idx] of shape (3, 5, {R})"
            )
        notes.append(kind)
    return f"{' and '.join(notes)} NF4 match the dequantized reference"
