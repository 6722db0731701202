"""Items that call every member directly: values, layouts, determinism, purity,
aliasing and retention.

Each item runs the members in dependency order (primitives, then the fused ops built
from them), one :class:`~paca.testing._members.Call` at a time, and blames the member it
called. A fused op that inherits the default and fails after one of its primitives
failed is reported as a consequence, not as a second defect.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import torch

from paca.testing._cases import (
    CONV_SHAPES,
    LINEAR_SHAPES,
    ConvShape,
    LinearShape,
    generated_shapes,
)
from paca.testing._contract import (
    CheckContext,
    ContractSkip,
    ContractViolation,
    Findings,
    bit_equal,
    bits,
    contract_item,
    dtype_name,
    per_dtype,
    shares_storage,
)
from paca.testing._members import Call, Case, Expect, Layout

#: Primitives first: a fused op's failure after one of them failed is a consequence.
MEMBER_ORDER = (
    "gather",
    "read_columns",
    "write_columns",
    "columns_applied",
    "linear",
    "input_grad",
    "delta_grad",
    "conv2d",
    "conv2d_input_grad",
    "conv2d_delta_grad",
    "linear_forward",
    "linear_backward",
    "conv2d_forward",
    "conv2d_backward",
)

#: A small 3-D case, and one with enough rows that the default ops swap in backward too.
SMALL = LinearShape((3, 5), 40, 24, 6)
SWAPPING = LinearShape((64,), 24, 16, 4)
CONV = ConvShape(2, 8, 6, (7, 7), (3, 3), 3, padding=(1, 1))


@lru_cache(maxsize=8)
def _generated(count: int) -> tuple[list[LinearShape], list[ConvShape]]:
    return generated_shapes(count)


def ordered(calls: Iterable[Call]) -> list[Call]:
    rank = {m: i for i, m in enumerate(MEMBER_ORDER)}
    return sorted(calls, key=lambda c: rank.get(c.member, len(rank)))


def run_calls(
    ctx: CheckContext, calls: Iterable[Call], check: Callable[[CheckContext, Call], None]
) -> Findings:
    """``check(ctx, call)`` for every call in member order, collecting one failure per member."""
    findings = Findings(ctx)
    for call in ordered(calls):
        if findings.known(call.member):
            continue  # one finding per member: the rest of its calls would only repeat it
        with findings.member(call.member, call.label):
            check(ctx, call)
    return findings


def _finish(findings: Findings, n_calls: int, what: str) -> str:
    findings.raise_if_any()
    return f"{n_calls} calls ({what})"


# ------------------------------------------------------------------ values and shapes
def check_values(ctx: CheckContext, call: Call) -> None:
    """The results match the reference, and the inputs are untouched (a member that writes
    an input it reads, e.g. scaling grad_out in place, is named here, before the fused op
    that calls it gets wrong results from the damage)."""
    t = call.make()
    before = _snapshot(call, t)
    results = call.invoke(ctx.backend, t)
    _expect_untouched(call, t, before)
    call.check(ctx, results)


def shape_cases(ctx: CheckContext, dtype: torch.dtype) -> list[Case]:
    gen_linear, gen_conv = _generated(ctx.generated)
    shapes: list[LinearShape | ConvShape] = [
        *LINEAR_SHAPES,
        *gen_linear,
        *CONV_SHAPES,
        *gen_conv,
        *ctx.extra_shapes,
    ]
    cases = [Case(ctx, s, dtype, salt=n) for n, s in enumerate(shapes)]
    if ctx.master_dtype(dtype) != dtype:  # also a delta kept in the compute dtype
        cases += [
            Case(ctx, LINEAR_SHAPES[0], dtype, Layout(delta_dtype=dtype), salt=90),
            Case(ctx, CONV_SHAPES[0], dtype, Layout(delta_dtype=dtype), salt=91),
        ]
    return cases


@per_dtype(
    "shapes",
    "every member vs the dense reference on fixed and generated shapes "
    "(r=1, r>8, r=in, >4096 and >65536 rows, 2-D/3-D/4-D, conv geometries)",
)
def check_shapes(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    cases = shape_cases(ctx, dtype)
    calls = [c for case in cases for c in case.calls()]
    findings = run_calls(ctx, calls, check_values)
    extra = f", {len(ctx.extra_shapes)} of them the vendor's" if ctx.extra_shapes else ""
    return _finish(findings, len(calls), f"{len(cases)} shapes{extra}")


# ------------------------------------------------------------------ layouts
class _GatherDims:
    """``gather`` along every dim of a 4-D tensor, positive and negative."""

    def __init__(self, ctx: CheckContext, dtype: torch.dtype) -> None:
        self.ctx, self.dtype = ctx, dtype
        self.x = ctx.randn(2, 3, 5, 7, salt=77).to(dtype)
        self.label = f"x (2, 3, 5, 7) {dtype_name(dtype)}"
        self.dims: dict[int, torch.Tensor] = {}

    def reference(self, variant: int = 0) -> dict[str, torch.Tensor]:
        x = self.x * (1 + variant)
        return {f"d{d}": x.index_select(d, idx) for d, idx in self.dims.items()}

    def calls(self) -> list[Call]:
        out = []
        for dim in (-4, -3, -2, -1, 0, 1, 2, 3):
            size = self.x.shape[dim]
            idx = torch.arange(size - 1, -1, -2, dtype=torch.long)  # descending, skips some
            self.dims[dim] = idx
            call = Call(
                "gather",
                f"gather(x, idx={idx.tolist()}, dim={dim}) on {self.label}",
                self,  # type: ignore[arg-type]
                run=lambda b, t, d=dim: {"x_sel": b.gather(t["x"], t[f"idx{d}"], d)},
                expect=lambda r, d=dim: {
                    "x_sel": Expect(r[f"d{d}"], self.dtype, exact=True, contiguous=True)
                },
            )
            out.append(call)
        return out

    def make(self, variant: int = 0) -> dict[str, Any]:
        t: dict[str, Any] = {"x": self.ctx.on_device(self.x * (1 + variant))}
        for dim in (-4, -3, -2, -1, 0, 1, 2, 3):
            size = self.x.shape[dim]
            t[f"idx{dim}"] = self.ctx.on_device(torch.arange(size - 1, -1, -2, dtype=torch.long))
        return t


def layout_cases(ctx: CheckContext, dtype: torch.dtype) -> list[tuple[Case, tuple[str, ...]]]:
    weight_members = ("read_columns", "write_columns", "columns_applied", "linear")
    fused = ("linear_forward", "linear_backward")
    grad_members = ("input_grad", "delta_grad", "linear_backward")
    conv_all = (
        "gather", "read_columns", "write_columns", "columns_applied", "conv2d",
        "conv2d_input_grad", "conv2d_delta_grad", "conv2d_forward", "conv2d_backward",
    )  # fmt: skip

    def lin(shape: LinearShape, salt: int, **lay: Any) -> Case:
        return Case(ctx, shape, dtype, Layout(**lay), salt=salt)

    return [
        (lin(SMALL, 1, weight="transposed"), (*weight_members, "input_grad", *fused)),
        (lin(SWAPPING, 2, weight="transposed"), (*weight_members, "input_grad", *fused)),
        (lin(SMALL, 3, weight="row_slice"), (*weight_members, *fused)),
        (lin(SMALL, 4, weight="col_strided"), (*weight_members, *fused)),
        (lin(SMALL, 5, x="strided"), ("gather", "linear", "linear_forward")),
        (lin(SMALL, 6, x="transposed"), ("gather", "linear", "linear_forward")),
        (lin(SMALL, 7, grad="strided"), grad_members),
        (lin(SWAPPING, 8, grad="transposed"), grad_members),
        (lin(SWAPPING, 9, grad="expanded"), grad_members),
        (lin(SMALL, 10, idx="run"), ("gather", "read_columns", "write_columns", *fused)),
        (lin(SWAPPING, 15, idx="run"), ("read_columns", "columns_applied", *fused)),
        (lin(SWAPPING, 11, idx="sorted"), ("gather", "columns_applied", *fused)),
        (Case(ctx, CONV, dtype, Layout(x="channels_last"), salt=12), conv_all),
        (Case(ctx, CONV, dtype, Layout(grad="channels_last"), salt=13), conv_all),
        (Case(ctx, CONV, dtype, Layout(weight="channels_last"), salt=14), conv_all),
    ]


@contract_item(
    "layouts",
    "members take the layouts the core passes: transposed (Conv1D), sliced and strided "
    "weights written through, strided/transposed/expanded inputs and grad_out, "
    "channels_last convs, sorted/unsorted/consecutive idx, gather on negative dims",
)
def check_layouts(ctx: CheckContext) -> str | None:
    dtype = ctx.primary_dtype
    calls = list(_GatherDims(ctx, dtype).calls())
    for case, members in layout_cases(ctx, dtype):
        calls += case.calls(members)
    findings = run_calls(ctx, calls, check_values)
    return _finish(findings, len(calls), dtype_name(dtype))


# ------------------------------------------------------------------ determinism
def _results_bits(results: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    return {
        k: (bits(v).clone() if isinstance(v, torch.Tensor) else None) for k, v in results.items()
    }


def check_deterministic(ctx: CheckContext, call: Call) -> None:
    first = _results_bits(call.invoke(ctx.backend, call.make()))
    second = _results_bits(call.invoke(ctx.backend, call.make()))
    for key, a in first.items():
        b = second[key]
        if a is None or b is None:
            continue
        if a.shape != b.shape or not torch.equal(a, b):
            n = int((a != b).sum()) if a.shape == b.shape else a.numel()
            raise ContractViolation(
                f"{call.label}: {key} differs between two calls with identical inputs "
                f"({n} of {a.numel()} values); declare `deterministic = False` if that is intended"
            )


def determinism_cases(ctx: CheckContext) -> list[Case]:
    cases = []
    for n, dtype in enumerate(ctx.declared_dtypes):
        cases += [
            Case(ctx, LinearShape((4099,), 24, 16, 6), dtype, salt=20 + n),
            Case(ctx, ConvShape(4, 4, 3, (33, 33), (3, 3), 2, padding=(1, 1)), dtype, salt=30 + n),
        ]
    return cases


@contract_item(
    "determinism",
    "the same inputs twice give bit-identical results, for every member and through a "
    "PaCA layer step (unless the backend declares deterministic = False)",
)
def check_determinism(ctx: CheckContext) -> str | None:
    if not ctx.backend.deterministic:
        raise ContractSkip("the backend declares deterministic = False")
    cases = determinism_cases(ctx)
    calls = [c for case in cases for c in case.calls()]
    findings = run_calls(ctx, calls, check_deterministic)
    from paca.testing._layers import layer_step_determinism

    for dtype in ctx.declared_dtypes:
        layer_step_determinism(ctx, dtype, findings)
    return _finish(findings, len(calls), ", ".join(map(dtype_name, ctx.declared_dtypes)))


# ------------------------------------------------------------------ purity
def _snapshot(call: Call, t: dict[str, Any]) -> dict[str, torch.Tensor]:
    keys = call.uses or tuple(t)
    return {
        k: bits(t[k]).clone()
        for k in keys
        if isinstance(t.get(k), torch.Tensor) and k not in call.writes
    }


def check_pure(ctx: CheckContext, call: Call) -> None:
    t = call.make()
    before = _snapshot(call, t)
    call.invoke(ctx.backend, t)
    _expect_untouched(call, t, before)


def _expect_untouched(call: Call, t: dict[str, Any], before: dict[str, torch.Tensor]) -> None:
    for key, was in before.items():
        now = bits(t[key])
        if not torch.equal(now, was):
            n = int((now != was).sum())
            raise ContractViolation(
                f"{call.label}: modified its input {_input_name(key)} ({n} of {was.numel()} "
                f"values changed); members must not write their inputs"
                + (" (weight must be bit-exact again on return)" if "weight" in key else "")
            )


def _input_name(key: str) -> str:
    return {
        "g2d": "grad_out",
        "xs2d": "x_sel",
        "weight_base": "weight (the stored parameter)",
    }.get(key, key)


def purity_cases(ctx: CheckContext) -> list[Case]:
    cases = []
    for n, dtype in enumerate(ctx.declared_dtypes):
        cases += [
            Case(ctx, SMALL, dtype, salt=40 + n),
            Case(ctx, SWAPPING, dtype, Layout(weight="transposed"), salt=43 + n),
            Case(ctx, SWAPPING, dtype, Layout(grad="expanded"), salt=46 + n),
            Case(ctx, CONV, dtype, salt=49 + n),
        ]
    return cases


@contract_item(
    "purity",
    "no member modifies its inputs (x, weight, bias, delta, idx, grad_out, x_sel), bit for bit",
)
def check_purity(ctx: CheckContext) -> str | None:
    calls = [c for case in purity_cases(ctx) for c in case.calls()]
    findings = run_calls(ctx, calls, check_pure)
    return _finish(findings, len(calls), ", ".join(map(dtype_name, ctx.declared_dtypes)))


# ------------------------------------------------------------------ aliasing
def check_unaliased(ctx: CheckContext, call: Call) -> None:
    if not call.owns_results:
        return
    t1 = call.make()
    r1 = call.invoke(ctx.backend, t1)
    outs1 = {k: v for k, v in r1.items() if isinstance(v, torch.Tensor)}
    for key, out in outs1.items():
        for name, inp in t1.items():
            if isinstance(inp, torch.Tensor) and shares_storage(out, inp):
                raise ContractViolation(
                    f"{call.label}: returned {key} sharing storage with its input "
                    f"{_input_name(name)}; results must be new tensors"
                    + (
                        " (a view keeps the whole input alive for backward)"
                        if key == "x_sel"
                        else ""
                    )
                )
    keys = list(outs1)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if shares_storage(outs1[a], outs1[b]):
                raise ContractViolation(f"{call.label}: returned {a} and {b} in one storage")
    kept = {k: bits(v).clone() for k, v in outs1.items()}
    t2 = call.make(variant=1)  # other values, same shapes: a reused buffer is overwritten
    r2 = call.invoke(ctx.backend, t2)
    # ...and the second call must see its own inputs (a cache keyed by shape or address,
    # which the allocator reuses, returns the first call's results)
    call.check(ctx, r2, variant=1)
    for key, out in outs1.items():
        other = r2.get(key)
        if isinstance(other, torch.Tensor) and shares_storage(out, other):
            raise ContractViolation(
                f"{call.label}: the second call returned {key} in the same storage as the "
                f"first call's (a reused buffer: the first result, still in use by an earlier "
                f"layer or step, is overwritten)"
            )
        if not torch.equal(bits(out), kept[key]):
            raise ContractViolation(
                f"{call.label}: the first call's {key} changed when the member was called again "
                f"with other inputs; results must not share memory across calls or layers"
            )


def aliasing_cases(ctx: CheckContext) -> list[Case]:
    cases = []
    for n, dtype in enumerate(ctx.declared_dtypes):
        cases += [
            Case(ctx, SMALL, dtype, salt=60 + n),
            Case(ctx, SWAPPING, dtype, Layout(idx="run"), salt=63 + n),
            Case(ctx, CONV, dtype, Layout(idx="run"), salt=66 + n),
        ]
    return cases


@contract_item(
    "aliasing",
    "results own their storage: never a view of an input, never shared between results, "
    "calls or layers (a second call leaves the first call's results intact)",
)
def check_aliasing(ctx: CheckContext) -> str | None:
    calls = [c for case in aliasing_cases(ctx) for c in case.calls()]
    findings = run_calls(ctx, calls, check_unaliased)
    from paca.testing._layers import two_layers_keep_their_results

    for dtype in ctx.declared_dtypes:
        two_layers_keep_their_results(ctx, dtype, findings)
    return _finish(findings, len(calls), ", ".join(map(dtype_name, ctx.declared_dtypes)))


# ------------------------------------------------------------------ retention
def storage_use_count(t: torch.Tensor) -> int | None:
    """How many tensors (and storage objects) hold ``t``'s storage, if torch can tell."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return None


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _holders(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int | None]]:
    return {k: (sys.getrefcount(v), storage_use_count(v)) for k, v in tensors.items()}


def check_releases(ctx: CheckContext, call: Call) -> None:
    t = call.make()
    tensors = {k: v for k, v in t.items() if isinstance(v, torch.Tensor)}
    before = _holders(tensors)
    alone = storage_use_count(torch.empty(1, device=ctx.device))
    results = call.invoke(ctx.backend, t)
    refs = []
    if call.owns_results:
        outs = {k: v for k, v in results.items() if isinstance(v, torch.Tensor)}
        out = None
        for key, out in outs.items():
            shared = any(
                shares_storage(out, o) for o in (*tensors.values(), *outs.values()) if o is not out
            )
            if key == "x_sel" and _storage_nbytes(out) > out.numel() * out.element_size():
                raise ContractViolation(
                    f"{call.label}: its result x_sel is a view into a larger storage "
                    f"({_storage_nbytes(out)} bytes for {out.numel() * out.element_size()}): "
                    f"saved for backward, it keeps all of that alive"
                )
            count = storage_use_count(out)
            own = alone + (out._base is not None) if alone is not None else None  # a view's base
            if not shared and count is not None and own is not None and count > own:
                raise ContractViolation(
                    f"{call.label}: keeps a reference to the storage of its result {key} "
                    f"(a cache or buffer the backend holds); results must be released with them"
                )
            refs.append((key, weakref.ref(out)))
        del outs, out
    del results
    after = _holders(tensors)
    if any(r() is not None for _, r in refs) or after != before:
        gc.collect()  # only when refcounting alone did not free everything: gc is slow
        after = _holders(tensors)
    for key, ref_ in refs:
        if ref_() is not None:
            raise ContractViolation(
                f"{call.label}: its result {key} stays alive after the caller dropped it "
                f"(the backend keeps a reference)"
            )
    for key, (objs, storage) in before.items():
        now_objs, now_storage = after[key]
        if now_objs > objs:
            raise ContractViolation(
                f"{call.label}: keeps its input {_input_name(key)} alive after returning "
                f"(a reference held by the backend: memory grows with every call)"
            )
        if storage is not None and now_storage is not None and now_storage > storage:
            raise ContractViolation(
                f"{call.label}: keeps a view or alias of its input {_input_name(key)} alive "
                f"after returning (its storage is still referenced: memory grows with every call)"
            )


@contract_item(
    "retention",
    "nothing a member saw or returned stays alive after it returns and the caller drops it; "
    "a PaCA layer step frees everything after backward and saves only x[..., idx]",
)
def check_retention(ctx: CheckContext) -> str | None:
    dtype = ctx.primary_dtype
    cases = [
        Case(ctx, SMALL, dtype, salt=70),
        Case(ctx, SWAPPING, dtype, Layout(weight="transposed"), salt=71),
        Case(ctx, CONV, dtype, salt=72),
    ]
    calls = [c for case in cases for c in case.calls()]
    findings = run_calls(ctx, calls, check_releases)
    from paca.testing._layers import layer_step_releases, saved_for_backward

    layer_step_releases(ctx, dtype, findings)
    saved_for_backward(ctx, dtype, findings)
    return _finish(findings, len(calls), dtype_name(dtype))


def expect_values(ctx: CheckContext, call: Call, results: dict[str, Any]) -> None:
    """For other modules: check ``results`` of ``call`` against its reference."""
    call.check(ctx, results)


__all__ = ["bit_equal", "check_values", "run_calls", "ordered"]


# ------------------------------------------------------------------ diagnosis
def diagnose(ctx: CheckContext, fused: str) -> dict[str, str]:
    """The primitives ``fused`` (a default fused op) is built from that fail their own
    value, purity or aliasing checks, with why: called when a fused op fails through a
    real layer and no primitive failed in the same item, to name the defect's member."""
    from paca.testing._contract import BUILT_FROM

    primitives = tuple(m for m in BUILT_FROM.get(fused, ()) if m not in FUSED_MEMBERS)
    if not primitives:
        return {}
    conv = fused.startswith("conv2d")
    found: dict[str, str] = {}
    inner = Findings(None)  # no diagnosis inside a diagnosis
    for n, dtype in enumerate(ctx.declared_dtypes):
        cases = (
            [Case(ctx, CONV, dtype, salt=2000 + n)]
            if conv
            else [
                Case(ctx, SMALL, dtype, salt=2000 + n),
                Case(ctx, SWAPPING, dtype, Layout(weight="transposed"), salt=2010 + n),
            ]
        )
        for call in ordered(c for case in cases for c in case.calls(primitives)):
            for check in (check_values, check_unaliased):
                if inner.known(call.member):
                    break
                with inner.member(call.member, call.label):
                    check(ctx, call)
    for member, why in inner.failures.items():
        found[member] = why
    return found


#: Members that are fused ops or built on others (never "primitives" in a diagnosis).
FUSED_MEMBERS = (
    "linear_forward",
    "linear_backward",
    "conv2d_forward",
    "conv2d_backward",
    "quantized_linear_forward",
    "quantized_linear_backward",
)
