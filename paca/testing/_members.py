"""Calling each backend member on one case, and what it should return.

A :class:`Case` is one shape in one dtype and memory layout. It makes fresh inputs on
the device under test (the same values every time, or other values for ``variant=1``)
and knows the dense fp64 reference of every result (:mod:`paca.testing._reference`).
:meth:`Case.calls` gives one :class:`Call` per member: how to call it with those inputs,
and what each of its results must be. The items in ``_checks_members`` run these calls
and check different promises on them (values, layouts, determinism, purity, aliasing,
retention), so a defect is always reported against the member that was called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from paca.testing import _reference as ref
from paca.testing._cases import ConvShape, LinearShape
from paca.testing._contract import (
    CheckContext,
    ContractViolation,
    dtype_name,
    expect_close,
    expect_device,
    expect_exact,
)

LINEAR_MEMBERS = (
    "gather",
    "read_columns",
    "write_columns",
    "columns_applied",
    "linear",
    "input_grad",
    "delta_grad",
    "linear_forward",
    "linear_backward",
)
CONV_MEMBERS = (
    "gather",
    "read_columns",
    "write_columns",
    "columns_applied",
    "conv2d",
    "conv2d_input_grad",
    "conv2d_delta_grad",
    "conv2d_forward",
    "conv2d_backward",
)
FUSED = ("linear_forward", "linear_backward", "conv2d_forward", "conv2d_backward")

_W = ("weight", "weight_base")
#: The inputs each member is handed (``weight`` is a view of the stored ``weight_base``;
#: ``g2d``/``xs2d`` are 2-D views of ``grad_out``/``x_sel``).
USES: dict[str, tuple[str, ...]] = {
    "gather": ("x", "idx"),
    "read_columns": (*_W, "idx"),
    "write_columns": (*_W, "idx", "columns"),
    "columns_applied": (*_W, "idx", "delta"),
    "linear": ("x", *_W, "bias"),
    "input_grad": ("grad_out", *_W),
    "delta_grad": ("g2d", "xs2d", "grad_out", "x_sel"),
    "linear_forward": ("x", *_W, "bias", "delta", "idx"),
    "linear_backward": ("grad_out", "x_sel", *_W, "delta", "idx"),
    "conv2d": ("x", *_W, "bias"),
    "conv2d_input_grad": ("grad_out", *_W),
    "conv2d_delta_grad": ("grad_out", "x_sel"),
    "conv2d_forward": ("x", *_W, "bias", "delta", "idx"),
    "conv2d_backward": ("grad_out", "x_sel", *_W, "delta", "idx"),
}


@dataclass(frozen=True)
class Layout:
    """How a case's tensors are laid out in memory (values never depend on it).

    ``weight``: ``"contiguous"``, ``"transposed"`` (``W.t()`` of an ``(in, out)`` tensor,
    as PaCA on transformers ``Conv1D`` passes it), ``"row_slice"`` (rows of a larger
    tensor), ``"col_strided"`` (every other column of a wider one), ``"channels_last"``
    (conv kernels). ``x`` / ``grad``: ``"contiguous"``, ``"strided"`` (stride 2 on the last
    dim), ``"transposed"`` (first two dims swapped), ``"expanded"`` (``grad`` only: stride
    0, what ``loss = y.sum()`` sends back), ``"channels_last"`` (conv). ``idx``:
    ``"unsorted"``, ``"sorted"``, ``"run"`` (ascending consecutive columns).
    ``delta_dtype``: None for the core's choice with fp32 master deltas, else that dtype.
    """

    weight: str = "contiguous"
    x: str = "contiguous"
    grad: str = "contiguous"
    idx: str = "unsorted"
    delta_dtype: torch.dtype | None = None

    def label(self) -> str:
        parts = [
            f"{k} {v}"
            for k, v in (("weight", self.weight), ("x", self.x), ("grad_out", self.grad))
            if v != "contiguous"
        ]
        if self.idx != "unsorted":
            parts.append(f"{self.idx} idx")
        if self.delta_dtype is not None:
            parts.append(f"{dtype_name(self.delta_dtype)} delta")
        return ", ".join(parts)


@dataclass
class Expect:
    """What one result must be: ``None``, or close to / exactly ``value`` in ``dtype``."""

    value: torch.Tensor | None
    dtype: torch.dtype | None = None
    tol: float = 0.0
    exact: bool = False
    contiguous: bool = False


@dataclass
class Call:
    """One call of ``member`` on a case, and what its results must be."""

    member: str
    label: str
    case: Case
    run: Callable[[Any, dict[str, Any]], dict[str, Any]] = None  # type: ignore[assignment]
    expect: Callable[[Any], dict[str, Expect]] = None  # type: ignore[assignment]
    #: inputs the member is allowed (required) to write
    writes: tuple[str, ...] = ()
    #: whether the results are the member's own tensors (False: our snapshots)
    owns_results: bool = True
    #: the inputs (keys of :meth:`Case.make`) the member is handed, directly or as views
    uses: tuple[str, ...] = ()

    def make(self, variant: int = 0) -> dict[str, Any]:
        return self.case.make(variant)

    def invoke(self, backend: Any, t: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():  # as inside the core's autograd functions
            return self.run(backend, t)

    def check(self, ctx: CheckContext, results: dict[str, Any], variant: int = 0) -> None:
        """Fail unless every result matches :attr:`expect` (values, dtype, device, layout)
        for the inputs of ``variant``."""
        for key, want in self.expect(self.case.reference(variant)).items():
            got = results.get(key)
            what = f"{self.label}: {key}"
            if want.value is None:
                if got is not None:
                    kind = type(got).__name__
                    raise ContractViolation(f"{what}: must be None, got a {kind}")
                continue
            if not isinstance(got, torch.Tensor):
                raise ContractViolation(
                    f"{what}: returned {type(got).__name__}, expected a tensor of shape "
                    f"{tuple(want.value.shape)}"
                )
            expect_device(what, got, ctx.device)
            if want.exact:
                expect_exact(what, got, want.value.to(want.dtype or want.value.dtype))
            else:
                expect_close(what, got, want.value, want.tol, want.dtype)
            if want.contiguous and not got.is_contiguous():
                raise ContractViolation(
                    f"{what}: not contiguous (strides {got.stride()}); it is saved for backward "
                    f"and must be a contiguous tensor of its own"
                )


def _idx(ctx: CheckContext, kind: str, n: int, r: int, salt: int) -> torch.Tensor:
    if kind == "run":
        start = (n - r) // 2
        return torch.arange(start, start + r, dtype=torch.long)
    idx = ctx.columns(n, r, salt)
    return idx.sort().values if kind == "sorted" else idx


class Case:
    """One shape in one dtype and layout: fresh inputs, the reference, and the calls."""

    def __init__(
        self,
        ctx: CheckContext,
        shape: LinearShape | ConvShape,
        dtype: torch.dtype,
        layout: Layout | None = None,
        salt: int = 0,
    ) -> None:
        self.ctx = ctx
        self.shape = shape
        self.dtype = dtype
        self.layout = layout or Layout()
        self.delta_dtype = self.layout.delta_dtype or ctx.master_dtype(dtype)
        self.salt = salt
        self.conv = isinstance(shape, ConvShape)
        self._cpu: dict[int, dict[str, Any]] = {}
        self._refs: dict[int, dict[str, torch.Tensor]] = {}
        extra = self.layout.label()
        self.label = f"{shape}, {dtype_name(dtype)}" + (f", {extra}" if extra else "")
        if self.delta_dtype != dtype and self.layout.delta_dtype is None:
            self.label += f" ({dtype_name(self.delta_dtype)} delta)"

    # ------------------------------------------------------------------ inputs
    def logical(self, variant: int = 0) -> dict[str, Any]:
        """The inputs' values on the CPU (cached): what every layout of them must equal."""
        if variant not in self._cpu:
            self._cpu[variant] = self._generate(variant)
        return self._cpu[variant]

    def _generate(self, variant: int) -> dict[str, Any]:
        ctx, s, dt, lay = self.ctx, self.shape, self.dtype, self.layout
        base = self.salt * 131 + variant * 7919

        def rnd(*shape: int, salt: int) -> torch.Tensor:
            return ctx.randn(*shape, salt=base + salt)

        if isinstance(s, LinearShape):
            x_shape, w_shape, d_shape = (*s.lead, s.n_in), (s.n_out, s.n_in), (s.n_out, s.r)
            g_shape, n_in, fan_in = (*s.lead, s.n_out), s.n_in, s.n_in
        else:
            x_shape = (s.batch, s.c_in, *s.hw)
            w_shape = (s.c_out, s.c_in, *s.kernel)
            d_shape = (s.c_out, s.r, *s.kernel)
            g_shape = (s.batch, s.c_out, *s.out_hw)
            n_in, fan_in = s.c_in, s.c_in * s.kernel[0] * s.kernel[1]
        t: dict[str, Any] = {
            "x": rnd(*x_shape, salt=1).to(dt),
            "weight": (rnd(*w_shape, salt=2) * fan_in**-0.5).to(dt),
            "bias": rnd(w_shape[0], salt=3).to(dt) if s.bias else None,
            "delta": (rnd(*d_shape, salt=4) * 0.05).to(self.delta_dtype),
            "idx": _idx(ctx, lay.idx, n_in, s.r, base + 5),
            "grad_out": rnd(*g_shape, salt=6).to(dt),
            "columns": rnd(*d_shape, salt=8),  # fp32: write_columns rounds once
        }
        if lay.grad == "expanded":
            t["grad_out"] = t["grad_out"].flatten()[:1].reshape(()).expand(g_shape).clone()
        dim = 1 if self.conv else -1
        t["x_sel"] = t["x"].index_select(dim, t["idx"])
        if lay.weight in ("row_slice", "col_strided"):
            w = t["weight"]
            if lay.weight == "row_slice":
                pad = (rnd(2, *w_shape[1:], salt=9).to(dt), rnd(3, *w_shape[1:], salt=10).to(dt))
                t["weight_base"] = torch.cat([pad[0], w, pad[1]])
            else:
                wide = rnd(w_shape[0], 2 * w_shape[1], *w_shape[2:], salt=9).to(dt)
                wide[:, ::2] = w
                t["weight_base"] = wide
        return t

    def weight_view(self, base: torch.Tensor) -> torch.Tensor:
        """The ``(out, in, ...)`` weight the backend gets, as a view of the stored parameter."""
        kind = self.layout.weight
        if kind == "transposed":
            return base.t()
        if kind == "row_slice":
            return base[2 : 2 + self.logical()["weight"].shape[0]]
        if kind == "col_strided":
            return base[:, ::2]
        return base

    def _stored_weight(self, w: torch.Tensor, t: dict[str, Any]) -> torch.Tensor:
        """The parameter as stored (on the CPU): what ``weight`` is a view of."""
        kind = self.layout.weight
        if kind == "transposed":
            return w.t().contiguous()
        if kind in ("row_slice", "col_strided"):
            return t["weight_base"]
        return w

    def make(self, variant: int = 0) -> dict[str, Any]:
        """Fresh tensors on the device, laid out as :attr:`layout` says (same values)."""
        t = self.logical(variant)
        dev = self.ctx.on_device
        lay = self.layout
        out: dict[str, Any] = {}
        base = dev(self._stored_weight(t["weight"], t))
        if lay.weight == "channels_last":
            base = base.contiguous(memory_format=torch.channels_last)
        out["weight_base"] = base
        out["weight"] = self.weight_view(base)
        out["x"] = _laid_out(dev(t["x"]), lay.x)
        out["grad_out"] = (
            dev(t["grad_out"].flatten()[:1].reshape(())).expand(t["grad_out"].shape)
            if lay.grad == "expanded"
            else _laid_out(dev(t["grad_out"]), lay.grad)
        )
        for key in ("bias", "delta", "idx", "columns", "x_sel"):
            out[key] = dev(t[key]) if t[key] is not None else None
        if not self.conv:
            out["g2d"] = out["grad_out"].reshape(-1, out["grad_out"].shape[-1])
            out["xs2d"] = out["x_sel"].reshape(-1, out["x_sel"].shape[-1])
        return out

    # ------------------------------------------------------------------ the reference
    @property
    def ref(self) -> dict[str, torch.Tensor]:
        return self.reference(0)

    def reference(self, variant: int = 0) -> dict[str, torch.Tensor]:
        """The reference results for the inputs of ``variant`` (computed once)."""
        if variant not in self._refs:
            self._refs[variant] = self._reference(variant)
        return self._refs[variant]

    def _reference(self, variant: int) -> dict[str, torch.Tensor]:
        t = self.logical(variant)
        w, idx, delta, grad = t["weight"], t["idx"], t["delta"], t["grad_out"]
        w_eff = ref.effective_weight(w, idx, delta)
        stored = self._stored_weight(w, t).clone()
        self.weight_view(stored).index_copy_(1, idx, t["columns"].to(w.dtype))
        if self.conv:
            s: ConvShape = self.shape  # type: ignore[assignment]
            geo = (s.stride, s.padding, s.dilation)
            eff = ref.dense_conv(t["x"], w_eff, t["bias"], grad, *geo)
            plain = ref.dense_conv(t["x"], w, t["bias"], grad, *geo)
        else:
            eff = ref.dense_linear(t["x"], w_eff, t["bias"], grad)
            plain = ref.dense_linear(t["x"], w, t["bias"], grad)
        return {
            "x_sel": t["x_sel"],
            "columns": w.index_select(1, idx),
            "written": stored,
            "w_eff": w_eff,
            "weight": w,
            "y_plain": plain.y,
            "dx_plain": plain.dx,
            "y": eff.y,
            "dx": eff.dx,
            "d_delta": eff.dw.index_select(1, idx),
        }

    # ------------------------------------------------------------------ the calls
    def calls(self, members: tuple[str, ...] | None = None) -> list[Call]:
        made = self._conv_calls() if self.conv else self._linear_calls()
        if members is not None:
            made = [c for c in made if c.member in members]
        for call in made:
            call.uses = USES[call.member]
        return made

    def _common_calls(self, dim: int) -> list[Call]:
        dt = self.dtype
        label = self.label
        calls = [
            Call(
                "gather",
                f"gather(x, idx, dim={dim}) on {label}",
                self,
                run=lambda b, t: {"x_sel": b.gather(t["x"], t["idx"], dim)},
                expect=lambda r: {"x_sel": Expect(r["x_sel"], dt, exact=True, contiguous=True)},
            ),
            Call(
                "read_columns",
                f"read_columns(weight, idx) on {label}",
                self,
                run=lambda b, t: {"columns": b.read_columns(t["weight"], t["idx"])},
                expect=lambda r: {"columns": Expect(r["columns"], dt, exact=True)},
            ),
            Call(
                "write_columns",
                f"write_columns(weight, idx, fp32 columns) on {label}",
                self,
                run=_write_columns,
                expect=lambda r: {
                    "returned": Expect(None),
                    "weight (the stored parameter, after)": Expect(r["written"], dt, exact=True),
                },
                writes=("weight", "weight_base"),
                owns_results=False,
            ),
            Call(
                "columns_applied",
                f"columns_applied(weight, idx, delta) on {label}",
                self,
                run=_columns_applied,
                expect=lambda r: {
                    "weight inside the block": Expect(r["w_eff"], dt, exact=True),
                    "weight after the block (restored)": Expect(r["weight"], dt, exact=True),
                },
                owns_results=False,
            ),
        ]
        return calls

    def _linear_calls(self) -> list[Call]:
        ctx, dt, dd = self.ctx, self.dtype, self.delta_dtype
        tol, dtol = ctx.tol(dt), ctx.tol(dd)
        label = self.label
        calls = self._common_calls(-1)
        nd = len(self.shape.lead) + 1  # type: ignore[union-attr]
        calls.insert(
            1,
            Call(
                "gather",
                f"gather(x, idx, dim={nd - 1}) on {label}",
                self,
                run=lambda b, t: {"x_sel": b.gather(t["x"], t["idx"], nd - 1)},
                expect=lambda r: {"x_sel": Expect(r["x_sel"], dt, exact=True, contiguous=True)},
            ),
        )
        calls += [
            Call(
                "linear",
                f"linear(x, weight, bias) on {label}",
                self,
                run=lambda b, t: {"y": b.linear(t["x"], t["weight"], t["bias"])},
                expect=lambda r: {"y": Expect(r["y_plain"], dt, tol)},
            ),
            Call(
                "input_grad",
                f"input_grad(grad_out, weight) on {label}",
                self,
                run=lambda b, t: {"grad_x": b.input_grad(t["grad_out"], t["weight"])},
                expect=lambda r: {"grad_x": Expect(r["dx_plain"], dt, tol)},
            ),
            Call(
                "delta_grad",
                f"delta_grad(grad_out (N, out), x_sel (N, r), {dtype_name(dd)}) on {label}",
                self,
                run=lambda b, t: {"grad_delta": b.delta_grad(t["g2d"], t["xs2d"], dd)},
                expect=lambda r: {"grad_delta": Expect(r["d_delta"], dd, dtol)},
            ),
            Call(
                "linear_forward",
                f"linear_forward(x, weight, bias, delta, idx) on {label}",
                self,
                run=lambda b, t: _pair(
                    "linear_forward",
                    b.linear_forward(t["x"], t["weight"], t["bias"], t["delta"], t["idx"]),
                    ("y", "x_sel"),
                ),
                expect=lambda r: {
                    "y": Expect(r["y"], dt, tol),
                    "x_sel": Expect(r["x_sel"], dt, exact=True, contiguous=True),
                },
            ),
        ]
        for need_x, need_d in ((True, True), (False, True), (True, False)):
            calls.append(
                Call(
                    "linear_backward",
                    f"linear_backward(..., need_input_grad={need_x}, need_delta_grad={need_d}) "
                    f"on {label}",
                    self,
                    run=lambda b, t, nx=need_x, nd_=need_d: _pair(
                        "linear_backward",
                        b.linear_backward(
                            t["grad_out"], t["x_sel"], t["weight"], t["delta"], t["idx"], nx, nd_
                        ),
                        ("grad_x", "grad_delta"),
                    ),
                    expect=lambda r, nx=need_x, nd_=need_d: {
                        "grad_x": Expect(r["dx"] if nx else None, dt, tol),
                        "grad_delta": Expect(r["d_delta"] if nd_ else None, dd, dtol),
                    },
                )
            )
        return calls

    def _conv_calls(self) -> list[Call]:
        ctx, dt, dd = self.ctx, self.dtype, self.delta_dtype
        s: ConvShape = self.shape  # type: ignore[assignment]
        geo = (s.stride, s.padding, s.dilation)
        tol = ctx.conv_tol(dt)
        dtol = ctx.conv_tol(dd)
        label = self.label
        x_shape = (s.batch, s.c_in, *s.hw)
        d_shape = (s.c_out, s.r, *s.kernel)
        calls = self._common_calls(1)
        calls.insert(
            1,
            Call(
                "gather",
                f"gather(x, idx, dim=-3) on {label}",
                self,
                run=lambda b, t: {"x_sel": b.gather(t["x"], t["idx"], -3)},
                expect=lambda r: {"x_sel": Expect(r["x_sel"], dt, exact=True, contiguous=True)},
            ),
        )
        calls += [
            Call(
                "conv2d",
                f"conv2d(x, weight, bias, ...) on {label}",
                self,
                run=lambda b, t: {"y": b.conv2d(t["x"], t["weight"], t["bias"], *geo)},
                expect=lambda r: {"y": Expect(r["y_plain"], dt, tol)},
            ),
            Call(
                "conv2d_input_grad",
                f"conv2d_input_grad(grad_out, weight, input_shape, ...) on {label}",
                self,
                run=lambda b, t: {
                    "grad_x": b.conv2d_input_grad(t["grad_out"], t["weight"], x_shape, *geo)
                },
                expect=lambda r: {"grad_x": Expect(r["dx_plain"], dt, tol)},
            ),
            Call(
                "conv2d_delta_grad",
                f"conv2d_delta_grad(grad_out, x_sel, delta_shape, ..., {dtype_name(dd)}) on {label}",
                self,
                run=lambda b, t: {
                    "grad_delta": b.conv2d_delta_grad(t["grad_out"], t["x_sel"], d_shape, *geo, dd)
                },
                expect=lambda r: {"grad_delta": Expect(r["d_delta"], dd, dtol)},
            ),
            Call(
                "conv2d_forward",
                f"conv2d_forward(x, weight, bias, delta, idx, ...) on {label}",
                self,
                run=lambda b, t: _pair(
                    "conv2d_forward",
                    b.conv2d_forward(t["x"], t["weight"], t["bias"], t["delta"], t["idx"], *geo),
                    ("y", "x_sel"),
                ),
                expect=lambda r: {
                    "y": Expect(r["y"], dt, tol),
                    "x_sel": Expect(r["x_sel"], dt, exact=True, contiguous=True),
                },
            ),
        ]
        for need_x, need_d in ((True, True), (False, True), (True, False)):
            calls.append(
                Call(
                    "conv2d_backward",
                    f"conv2d_backward(..., need_input_grad={need_x}, need_delta_grad={need_d}) "
                    f"on {label}",
                    self,
                    run=lambda b, t, nx=need_x, nd_=need_d: _pair(
                        "conv2d_backward",
                        b.conv2d_backward(
                            t["grad_out"],
                            t["x_sel"],
                            t["weight"],
                            t["delta"],
                            t["idx"],
                            x_shape,
                            *geo,
                            nx,
                            nd_,
                        ),
                        ("grad_x", "grad_delta"),
                    ),  # fmt: skip
                    expect=lambda r, nx=need_x, nd_=need_d: {
                        "grad_x": Expect(r["dx"] if nx else None, dt, tol),
                        "grad_delta": Expect(r["d_delta"] if nd_ else None, dd, dtol),
                    },
                )
            )
        return calls

    def with_layout(self, **changes: Any) -> Case:
        return Case(self.ctx, self.shape, self.dtype, replace(self.layout, **changes), self.salt)


def _laid_out(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in another memory layout (a view of a new tensor on t's device)."""
    if kind == "contiguous":
        return t
    if kind == "strided":
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    raise ValueError(f"unknown layout {kind!r}")


def _pair(member: str, got: Any, names: tuple[str, str]) -> dict[str, Any]:
    if not isinstance(got, tuple | list) or len(got) != 2:
        raise ContractViolation(f"must return a pair {names}, got {type(got).__name__}", member)
    return dict(zip(names, got, strict=True))


def _write_columns(b: Any, t: dict[str, Any]) -> dict[str, Any]:
    returned = b.write_columns(t["weight"], t["idx"], t["columns"])
    return {"returned": returned, "weight (the stored parameter, after)": t["weight_base"]}


def _columns_applied(b: Any, t: dict[str, Any]) -> dict[str, Any]:
    inside = None
    with b.columns_applied(t["weight"], t["idx"], t["delta"]):
        inside = t["weight"].clone()
    return {"weight inside the block": inside, "weight after the block (restored)": t["weight"]}
