"""Real PaCA layers on the backend, and their dense reference.

The suite drives the backend through the layers users train (``PacaLinear``,
``PacaConv1D`` on the transposed ``(in, out)`` weight transformers' ``Conv1D`` stores,
``PacaConv2d``), so the core's casts, contract checks, saved tensors and step hooks are
part of what is checked. ``Conv1D`` is reproduced here (:class:`Conv1DLike`, same
weight layout and math) so the suite does not need transformers.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paca.testing import _reference as ref
from paca.testing._contract import (
    CheckContext,
    ContractViolation,
    Findings,
    bits,
    dtype_name,
    expect_close,
)

KINDS = ("linear", "conv1d", "conv2d")
FORWARD = {"linear": "linear_forward", "conv1d": "linear_forward", "conv2d": "conv2d_forward"}
BACKWARD = {"linear": "linear_backward", "conv1d": "linear_backward", "conv2d": "conv2d_backward"}


class Conv1DLike(nn.Module):
    """transformers ``Conv1D``'s layout and math: ``weight`` is ``(in, out)``, ``y = x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


@dataclass
class LayerSpec:
    kind: str
    n_in: int = 24
    n_out: int = 16
    r: int = 5
    lead: tuple[int, ...] = (3, 7)
    hw: tuple[int, int] = (6, 6)
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1

    @property
    def x_shape(self) -> tuple[int, ...]:
        if self.kind == "conv2d":
            return (self.lead[0], self.n_in, *self.hw)
        return (*self.lead, self.n_in)

    def label(self, dtype: torch.dtype) -> str:
        names = {
            "linear": "PacaLinear (nn.Linear)",
            "conv1d": "PacaConv1D (transposed (in, out) weight, as transformers Conv1D)",
            "conv2d": "PacaConv2d (nn.Conv2d)",
        }
        return f"{names[self.kind]} x {self.x_shape} r={self.r} {dtype_name(dtype)}"


def make_layer(
    ctx: CheckContext,
    spec: LayerSpec,
    dtype: torch.dtype,
    *,
    salt: int = 0,
    delta_dtype: str | None = "float32",
    backend: Any = None,
) -> nn.Module:
    """A PaCA layer around a frozen base with seeded weights, non-zero delta, unsorted idx."""
    from paca.layer import PacaLinear
    from paca.layers_conv import PacaConv1D, PacaConv2d

    b = backend if backend is not None else ctx.backend
    if spec.kind == "linear":
        base: nn.Module = nn.Linear(spec.n_in, spec.n_out)
        w_shape: tuple[int, ...] = (spec.n_out, spec.n_in)
        cls: Any = PacaLinear
        fan_in = spec.n_in
    elif spec.kind == "conv1d":
        base = Conv1DLike(spec.n_out, spec.n_in)
        w_shape = (spec.n_in, spec.n_out)
        cls = PacaConv1D
        fan_in = spec.n_in
    else:
        base = nn.Conv2d(
            spec.n_in, spec.n_out, spec.kernel, spec.stride, spec.padding, spec.dilation
        )
        w_shape = (spec.n_out, spec.n_in, spec.kernel, spec.kernel)
        cls = PacaConv2d
        fan_in = spec.n_in * spec.kernel**2
    with torch.no_grad():
        base.weight.copy_(ctx.randn(*w_shape, salt=salt + 1) * fan_in**-0.5)
        base.bias.copy_(ctx.randn(spec.n_out, salt=salt + 2) * 0.1)
    base = base.to(device=ctx.device, dtype=dtype).requires_grad_(False)
    layer = cls(base, b)
    idx = ctx.columns(spec.n_in, spec.r, salt=salt + 3)
    layer.add_adapter("default", idx.to(ctx.device), delta_dtype)
    with torch.no_grad():
        d = layer.paca_delta["default"]
        d.copy_(ctx.randn(*d.shape, salt=salt + 4) * 0.05)
    return layer


def layer_inputs(
    ctx: CheckContext, layer: nn.Module, spec: LayerSpec, salt: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (fp32, on the device) and a ``grad_out`` for it (fp32)."""
    x = ctx.randn(*spec.x_shape, salt=salt + 11)
    with torch.no_grad():
        base = layer.base_layer
        y_shape = base(x.to(ctx.device, next(base.parameters()).dtype)).shape
    g = ctx.randn(*y_shape, salt=salt + 12)
    return ctx.on_device(x), ctx.on_device(g)


@dataclass
class Step:
    y: torch.Tensor
    dx: torch.Tensor | None
    d_delta: torch.Tensor | None


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def layer_step(
    layer: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    compute: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> Step:
    """Forward (under ``autocast(compute)`` if given) and backward of one layer."""
    dtype = dtype or layer.weight_oi().dtype
    xin = x.detach().to(dtype if compute is None else x.dtype).clone().requires_grad_(True)
    delta = layer.paca_delta["default"]
    delta.grad = None
    with autocast(xin.device, compute):
        y = layer(xin)
    y.backward(grad_out.to(y.dtype, copy=True))  # a copy: steps never share a grad_out
    return Step(y.detach(), xin.grad, None if delta.grad is None else delta.grad.detach().clone())


def dense_step(
    layer: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    compute: torch.dtype | None = None,
) -> Step:
    """The dense fp64 reference of :func:`layer_step` on the same (rounded) inputs."""
    base = layer.base_layer
    w = layer.weight_oi().detach()
    dtype = compute or w.dtype
    w = w.to(dtype)
    bias = base.bias.detach().to(dtype) if base.bias is not None else None
    idx = layer.paca_idx["default"]
    delta = layer.paca_delta["default"].detach()
    w_eff = ref.effective_weight(w, idx, delta)
    xin = x.detach().to(dtype if compute is None else x.dtype).to(dtype)
    g = grad_out.to(dtype)
    if w.dim() == 4:
        dense = ref.dense_conv(
            xin, w_eff, bias, g, tuple(base.stride), tuple(base.padding), tuple(base.dilation)
        )
    else:
        dense = ref.dense_linear(xin, w_eff, bias, g)
    return Step(dense.y, dense.dx, dense.dw.index_select(1, ref.cpu(idx)))


def compare_step(
    ctx: CheckContext,
    what: str,
    got: Step,
    want: Step,
    dtype: torch.dtype,
    kind: str,
    findings: Findings,
    *,
    x_dtype: torch.dtype | None = None,
    delta_dtype: torch.dtype = torch.float32,
) -> None:
    """Compare a layer step with its dense reference, blaming forward or backward."""
    tol = ctx.conv_tol(dtype) if kind == "conv2d" else ctx.tol(dtype)
    dtol = ctx.conv_tol(delta_dtype) if kind == "conv2d" else ctx.tol(delta_dtype)
    with findings.member(FORWARD[kind], what):
        expect_close(f"{what}: output", got.y, want.y, tol, dtype)
    with findings.member(BACKWARD[kind], what):
        if got.dx is None or got.d_delta is None:
            raise ContractViolation(f"{what}: x.grad or delta.grad is None after backward")
        expect_close(f"{what}: input gradient", got.dx, want.dx, tol, x_dtype or dtype)
        expect_close(f"{what}: delta gradient", got.d_delta, want.d_delta, dtol, delta_dtype)


def specs() -> list[LayerSpec]:
    return [
        LayerSpec("linear"),
        LayerSpec("conv1d", n_in=20, n_out=28, r=9, lead=(2, 5)),
        LayerSpec("conv2d", n_in=6, n_out=5, r=2, lead=(2,), hw=(7, 7)),
    ]


# ------------------------------------------------------------------ shared layer checks
def layer_step_determinism(ctx: CheckContext, dtype: torch.dtype, findings: Findings) -> None:
    for n, spec in enumerate(specs()):
        what = f"two identical steps of {spec.label(dtype)}"
        with findings.member(FORWARD[spec.kind], what):
            layer = make_layer(ctx, spec, dtype, salt=300 + 10 * n)
            x, g = layer_inputs(ctx, layer, spec, salt=300 + 10 * n)
            a, b = layer_step(layer, x, g), layer_step(layer, x, g)
            if not torch.equal(bits(a.y), bits(b.y)):
                raise ContractViolation(f"{what}: the outputs differ")
        with findings.member(BACKWARD[spec.kind], what):
            for label, u, v in (("input", a.dx, b.dx), ("delta", a.d_delta, b.d_delta)):
                if u is not None and v is not None and not torch.equal(bits(u), bits(v)):
                    raise ContractViolation(f"{what}: the {label} gradients differ")


def two_layers_keep_their_results(
    ctx: CheckContext, dtype: torch.dtype, findings: Findings
) -> None:
    """Two layers of one shape in a row: the first one's output and saved ``x_sel`` must
    survive the second one's call (a backend reusing one buffer for every layer fails)."""
    for kind, spec in (
        ("linear", LayerSpec("linear", n_in=24, n_out=24, r=5, lead=(4, 6))),
        ("conv2d", LayerSpec("conv2d", n_in=6, n_out=6, r=2, lead=(2,), hw=(6, 6))),
    ):
        what = f"two {spec.label(dtype)} layers in a row"
        first = make_layer(ctx, spec, dtype, salt=400)
        second = make_layer(ctx, spec, dtype, salt=410)
        x, g = layer_inputs(ctx, first, spec, salt=420)
        x = x.to(dtype).requires_grad_(True)
        with findings.member(FORWARD[kind], what):
            y1 = first(x)
            kept = bits(y1).clone()
            y2 = second(y1)
            if not torch.equal(bits(y1), kept):
                raise ContractViolation(
                    f"{what}: the first layer's output changed during the second layer's forward "
                    f"(results share a buffer across layers)"
                )
        with findings.member(BACKWARD[kind], what):
            y2.backward(g.to(y2.dtype))
            # dense reference of the pair, in fp64, on the same rounded inputs
            w1, w2 = (
                ref.effective_weight(m.weight_oi(), m.paca_idx["default"], m.paca_delta["default"])
                for m in (first, second)
            )
            xd = ref.cpu(x).double().requires_grad_(True)
            op = (
                (lambda t, w, m: F.conv2d(t, w.double(), ref.cpu(m.base_layer.bias).double(), 1, 1))
                if kind == "conv2d"
                else (lambda t, w, m: F.linear(t, w.double(), ref.cpu(m.base_layer.bias).double()))
            )
            w1d = w1.double().requires_grad_(True)
            w2d = w2.double().requires_grad_(True)
            with torch.enable_grad():
                out = op(op(xd, w1d, first), w2d, second)
                out.backward(ref.cpu(g).double())
            tol = (ctx.conv_tol if kind == "conv2d" else ctx.tol)(dtype)
            idx1, idx2 = (ref.cpu(m.paca_idx["default"]) for m in (first, second))
            expect_close(
                f"{what}: first layer's delta gradient",
                first.paca_delta["default"].grad,
                w1d.grad.index_select(1, idx1),
                tol,
            )
            expect_close(
                f"{what}: second layer's delta gradient",
                second.paca_delta["default"].grad,
                w2d.grad.index_select(1, idx2),
                tol,
            )
            expect_close(f"{what}: input gradient", x.grad, xd.grad, tol)


def layer_step_releases(ctx: CheckContext, dtype: torch.dtype, findings: Findings) -> None:
    for n, spec in enumerate(specs()):
        what = f"a step of {spec.label(dtype)}"
        with findings.member(BACKWARD[spec.kind], what):
            layer = make_layer(ctx, spec, dtype, salt=500 + 10 * n)
            refs = _step_and_forget(ctx, layer, spec, dtype, salt=500 + 10 * n)
            if any(r() is not None for _, r in refs):
                gc.collect()  # only when refcounting alone did not free everything
            alive = [name for name, r in refs if r() is not None]
            if alive:
                raise ContractViolation(
                    f"{what}: after backward, with the caller's references dropped and gc run, "
                    f"{', '.join(alive)} still alive (the backend keeps a reference)"
                )


def _step_and_forget(
    ctx: CheckContext, layer: nn.Module, spec: LayerSpec, dtype: torch.dtype, salt: int
) -> list[tuple[str, weakref.ref]]:
    x, g = layer_inputs(ctx, layer, spec, salt=salt)
    x = x.to(dtype).requires_grad_(True)
    y = layer(x)
    y.backward(g.to(y.dtype))
    return [
        ("the input x", weakref.ref(x)),
        ("the output y", weakref.ref(y)),
        ("x.grad", weakref.ref(x.grad)),
    ]


def saved_for_backward(ctx: CheckContext, dtype: torch.dtype, findings: Findings) -> None:
    """The op saves ``x[..., idx]`` of the activations (whole storages counted) and no more."""
    for n, spec in enumerate(specs()):
        what = f"what {spec.label(dtype)} saves for backward"
        with findings.member(FORWARD[spec.kind], what):
            layer = make_layer(ctx, spec, dtype, salt=600 + 10 * n)
            x, g = layer_inputs(ctx, layer, spec, salt=600 + 10 * n)
            x = x.to(dtype).requires_grad_(True)
            owned = {_key(t) for t in (*layer.parameters(), *layer.buffers())}
            saved: list[torch.Tensor] = []

            def pack(t: torch.Tensor, owned=owned, saved=saved) -> torch.Tensor:
                if _key(t) not in owned:
                    saved.append(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = layer(x)
            got = sum(dict(_storage_bytes(t) for t in saved).values())
            want = x.numel() // spec.n_in * spec.r * x.element_size()
            if got != want:
                shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in saved) or "nothing"
                raise ContractViolation(
                    f"{what}: {got} bytes of storage saved ({shapes}); expected {want} bytes, "
                    f"x[..., idx] only (r/in of the input): x_sel must be a tensor of its own"
                )
            y.backward(g.to(y.dtype))


def _key(t: torch.Tensor) -> object:
    ptr = t.untyped_storage().data_ptr()
    return ptr if ptr else ("no-pointer", tuple(t.shape), t.dtype)


def _storage_bytes(t: torch.Tensor) -> tuple[object, int]:
    nbytes = t.untyped_storage().nbytes() if t.untyped_storage().data_ptr() else 0
    return _key(t), nbytes or t.numel() * t.element_size()


@contextlib.contextmanager
def replaced(backend: Any, member: str, fn: Any) -> Iterator[None]:
    """``backend.member`` is ``fn`` inside the block (an instance attribute, restored after)."""
    had = member in backend.__dict__
    old = backend.__dict__.get(member)
    setattr(backend, member, fn)
    try:
        yield
    finally:
        if had:
            setattr(backend, member, old)
        else:
            with contextlib.suppress(AttributeError):
                delattr(backend, member)
