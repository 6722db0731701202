"""Items about the PaCA layer step as a whole: the pretrained weight stays bit-exact,
the runtime contract between core and backend, each dtype capability through real
layers (and autocast), and the write-traffic bound."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from torch import nn

from paca.backend_abc import BackendCapabilityError, BackendContractError
from paca.testing import _layers as L
from paca.testing._cases import ConvShape, LinearShape
from paca.testing._checks_members import CONV, SWAPPING, ordered, run_calls
from paca.testing._contract import (
    DTYPE_CAPABILITIES,
    CheckContext,
    ContractSkip,
    ContractViolation,
    Findings,
    bits,
    contract_item,
    dtype_name,
    expect_close,
    per_dtype,
)
from paca.testing._members import FUSED, Call, Case, Layout


class Injected(RuntimeError):
    """Raised on purpose inside an op by the suite."""


def _raiser(member: str) -> Any:
    def fail(*_: Any, **__: Any) -> Any:
        raise Injected(f"injected failure in {member}")

    return fail


# ------------------------------------------------------------------ W bit-exact
#: The primitives each default fused op calls while the columns are applied.
INJECT = {
    "linear_forward": ("linear",),
    "linear_backward": ("input_grad", "delta_grad"),
    "conv2d_forward": ("conv2d",),
    "conv2d_backward": ("conv2d_input_grad", "conv2d_delta_grad"),
}


def _weight_unchanged(call: Call, t: dict[str, Any], before: torch.Tensor, when: str) -> None:
    now = bits(t["weight_base"])
    if not torch.equal(now, before):
        n = int((now != before).sum())
        raise ContractViolation(
            f"{call.label}: the weight is not bit-exact {when} ({n} of {before.numel()} values "
            f"differ); the swapped columns must be restored exactly"
        )


def check_weight_after(ctx: CheckContext, call: Call) -> None:
    """The fused op (or the swap) leaves W bit-exact: on return, and when it raises."""
    b = ctx.backend
    t = call.make()
    before = bits(t["weight_base"]).clone()
    if call.member == "columns_applied":
        version = t["weight_base"]._version
        with b.columns_applied(t["weight"], t["idx"], t["delta"]):
            pass
        if t["weight_base"]._version != version:
            raise ContractViolation(
                f"{call.label}: bumped the weight's autograd version counter (write through "
                f"weight.data, so that other ops that saved the weight stay valid)"
            )
        try:
            with b.columns_applied(t["weight"], t["idx"], t["delta"]):
                raise Injected("raised inside the block")
        except Injected:
            pass
        else:
            raise ContractViolation(
                f"{call.label}: an exception raised inside the block was swallowed; it must "
                f"propagate (after the columns are restored)"
            )
        _weight_unchanged(call, t, before, "after an exception inside the block")
        return
    version = t["weight_base"]._version
    call.invoke(b, t)
    _weight_unchanged(call, t, before, "after the call returned")
    if t["weight_base"]._version != version:
        raise ContractViolation(
            f"{call.label}: bumped the weight's autograd version counter (write the swapped "
            f"columns through weight.data, as the default columns_applied does, so that other "
            f"ops that saved the weight for backward stay valid)"
        )
    for primitive in INJECT.get(call.member, ()):
        t = call.make()
        with L.replaced(b, primitive, _raiser(primitive)), contextlib.suppress(Exception):
            call.invoke(b, t)  # any exception: W must be exact after it
        _weight_unchanged(call, t, before, f"after {primitive} raised inside {call.member}")


def _layer_weight_exact(ctx: CheckContext, dtype: torch.dtype, findings: Findings) -> None:
    """Through real layers: W bit-exact (and its version counter unchanged) after forward,
    backward, optimizer steps, and exceptions raised inside the op."""
    for n, spec in enumerate(L.specs()):
        fwd, bwd = L.FORWARD[spec.kind], L.BACKWARD[spec.kind]
        what = spec.label(dtype)
        layer = L.make_layer(ctx, spec, dtype, salt=700 + 10 * n)
        w = layer.base_layer.weight
        want, version = bits(w).clone(), w._version
        x, g = L.layer_inputs(ctx, layer, spec, salt=700 + 10 * n)
        x = x.to(dtype).requires_grad_(True)

        def same(when: str, member: str, w=w, want=want, version=version, what=what) -> None:
            if not torch.equal(bits(w), want):
                raise ContractViolation(
                    f"{what}: the stored weight is not bit-exact {when}", member
                )
            if w._version != version:
                raise ContractViolation(
                    f"{what}: the weight's autograd version counter changed {when} (write "
                    f"through weight.data, as the default swap does, so that other ops that "
                    f"saved the weight for backward stay valid)",
                    member,
                )

        with findings.member(fwd, what):
            y = layer(x)
            same("after forward", fwd)
        with findings.member(bwd, what):
            y.backward(g.to(y.dtype))
            same("after backward", bwd)
        with findings.member(bwd, what):
            for kw in ({"foreach": True}, {"fused": True}):
                try:
                    opt = torch.optim.AdamW(layer.paca_delta.parameters(), lr=1e-2, **kw)
                    opt.step()
                except RuntimeError as exc:  # fused AdamW unsupported on this device/dtype
                    if "fused" not in kw or "fused" not in str(exc).lower():
                        raise
                    continue
                same(f"after an AdamW step ({next(iter(kw))})", bwd)
                y = layer(x)
                y.backward(g.to(y.dtype))
                same(f"after a step following AdamW ({next(iter(kw))})", bwd)
        primitive = "conv2d" if spec.kind == "conv2d" else "linear"
        with findings.member(fwd, what):
            with (
                L.replaced(ctx.backend, primitive, _raiser(primitive)),
                contextlib.suppress(Exception),
            ):
                layer(x)
            same(f"after {primitive} raised inside the layer's forward", fwd)
        grad_primitive = "conv2d_input_grad" if spec.kind == "conv2d" else "input_grad"
        with findings.member(bwd, what):
            y = layer(x)
            with (
                L.replaced(ctx.backend, grad_primitive, _raiser(grad_primitive)),
                contextlib.suppress(Exception),
            ):
                y.backward(g.to(y.dtype))
            same(f"after {grad_primitive} raised inside the layer's backward", bwd)


@contract_item(
    "weight_exact",
    "the pretrained weight is bit-exact after every fused op and swap returns or raises, "
    "and through real layers after forward, backward, AdamW steps and exceptions",
)
def check_weight_exact(ctx: CheckContext) -> str | None:
    dtype = ctx.primary_dtype
    cases = [
        Case(ctx, SWAPPING, dtype, salt=80),
        Case(ctx, SWAPPING, dtype, Layout(weight="transposed"), salt=81),
        Case(ctx, LinearShape((5,), 24, 16, 4), dtype, salt=82),  # decomposition sizes
        Case(ctx, CONV, dtype, salt=83),
        Case(ctx, CONV, dtype, Layout(weight="channels_last"), salt=84),
    ]
    calls = [c for case in cases for c in case.calls((*FUSED, "columns_applied"))]
    findings = run_calls(ctx, calls, check_weight_after)
    _layer_weight_exact(ctx, dtype, findings)
    findings.raise_if_any()
    return f"{len(calls)} op calls and {len(L.specs())} layers ({dtype_name(dtype)})"


# ------------------------------------------------------------------ runtime contract
_MEMBER_IN_MESSAGE = re.compile(
    r"\b(linear_forward|linear_backward|conv2d_forward|conv2d_backward)\b"
)


def check_declared_results(ctx: CheckContext, call: Call) -> None:
    """Shapes, dtypes and devices of a member's results (values are other items' job)."""
    results = call.invoke(ctx.backend, call.make())
    for key, want in call.expect(call.case.ref).items():
        got = results.get(key)
        what = f"{call.label}: {key}"
        if want.value is None:
            if got is not None:
                raise ContractViolation(f"{what}: must be None, got {type(got).__name__}")
            continue
        if not isinstance(got, torch.Tensor):
            raise ContractViolation(f"{what}: returned {type(got).__name__}, not a tensor")
        dtype = want.dtype or want.value.dtype
        if tuple(got.shape) != tuple(want.value.shape) or got.dtype != dtype:
            raise ContractViolation(
                f"{what}: returned shape {tuple(got.shape)} and dtype {got.dtype}, the contract "
                f"says {tuple(want.value.shape)} and {dtype}"
            )
        if got.device.type != ctx.device.type:
            raise ContractViolation(f"{what}: on {got.device}, expected {ctx.device}")


def _through_core(ctx: CheckContext, findings: Findings) -> None:
    """Real layers in every declared dtype: the core accepts what the backend returns."""
    for dtype in ctx.declared_dtypes:
        for n, spec in enumerate(L.specs()):
            what = f"{spec.label(dtype)} through the core"
            with findings.member(L.FORWARD[spec.kind], what):
                layer = L.make_layer(ctx, spec, dtype, salt=800 + 10 * n)
                x, g = L.layer_inputs(ctx, layer, spec, salt=800 + 10 * n)
                try:
                    L.layer_step(layer, x, g)
                except BackendContractError as exc:
                    found = _MEMBER_IN_MESSAGE.search(str(exc))
                    raise ContractViolation(
                        f"{what}: the core reported {type(exc).__name__}: {exc}",
                        found.group(1) if found else None,
                    ) from exc


_FAULTS = {
    "the wrong shape": lambda out: tuple(o[..., :-1] if o is not None else o for o in out),
    "the wrong dtype": lambda out: tuple(
        o.to(torch.float64) if isinstance(o, torch.Tensor) else o for o in out
    ),
    "one tensor instead of a pair": lambda out: out[0],
}


def _core_reports(ctx: CheckContext, findings: Findings) -> None:
    """The core turns a backend's broken results into BackendContractError naming it and the
    member (checked by faking faults around the backend's own fused ops)."""
    b = ctx.backend
    dtype = ctx.primary_dtype
    for n, spec in enumerate((L.specs()[0], L.specs()[2])):
        layer = L.make_layer(ctx, spec, dtype, salt=900 + 10 * n)
        x, g = L.layer_inputs(ctx, layer, spec, salt=900 + 10 * n)
        for member in (L.FORWARD[spec.kind], L.BACKWARD[spec.kind]):
            real = getattr(b, member)
            faults = dict(_FAULTS)
            faults["an exception"] = None
            for fault, change in faults.items():

                def faulty(*args: Any, _real: Any = real, _change: Any = change) -> Any:
                    if _change is None:
                        raise ValueError("a backend bug")
                    return _change(_real(*args))

                with findings.member("paca core", f"{member} returning {fault}"):
                    with L.replaced(b, member, faulty):
                        try:
                            L.layer_step(layer, x, g)
                        except BackendContractError as exc:
                            text = str(exc)
                            if b.name not in text or member not in text:
                                raise ContractViolation(
                                    f"{member} returning {fault}: the core's BackendContractError "
                                    f"does not name the backend {b.name!r} and the member: {text}"
                                ) from exc
                            continue
                        except Exception as exc:
                            raise ContractViolation(
                                f"{member} returning {fault}: the core raised "
                                f"{type(exc).__name__} ({exc}) instead of BackendContractError"
                            ) from exc
                    raise ContractViolation(
                        f"{member} returning {fault}: the core accepted it silently"
                    )


@contract_item(
    "runtime_contract",
    "every member returns the documented shapes and dtypes; the core accepts the backend's "
    "results in real layers and reports broken ones as BackendContractError naming the member",
)
def check_runtime_contract(ctx: CheckContext) -> str | None:
    calls: list[Call] = []
    for n, dtype in enumerate(ctx.declared_dtypes):
        for case in (
            Case(ctx, LinearShape((3, 5), 40, 24, 6), dtype, salt=810 + n),
            Case(ctx, ConvShape(2, 8, 6, (7, 7), (3, 3), 3, padding=(1, 1)), dtype, salt=820 + n),
        ):
            calls += case.calls()
    findings = run_calls(ctx, ordered(calls), check_declared_results)
    _through_core(ctx, findings)
    _core_reports(ctx, findings)
    findings.raise_if_any()
    return f"{len(calls)} calls, {len(ctx.declared_dtypes) * len(L.specs())} layer steps"


# ------------------------------------------------------------------ dtype capabilities
def _merge_roundtrip(
    ctx: CheckContext, layer: nn.Module, x: torch.Tensor, what: str, tol: float
) -> None:
    """merge writes round(W + delta) through write_columns into the stored parameter;
    unmerge restores it bit for bit."""
    base = layer.base_layer
    stored = bits(base.weight).clone()
    w_eff = L.ref.effective_weight(
        layer.weight_oi(), layer.paca_idx["default"], layer.paca_delta["default"]
    )
    with torch.no_grad():
        want = layer(x)
        layer.merge("default")
        merged_w = layer.weight_oi().detach().clone()
        merged = base(x)
        layer.unmerge()
    if not torch.equal(bits(merged_w), bits(w_eff)):
        raise ContractViolation(
            f"{what}: after merge, the stored weight is not round(W + delta) in the trained "
            f"columns (merge writes through write_columns: it must write the parameter itself, "
            f"also through a transposed view)",
            "write_columns",
        )
    expect_close(f"{what}: merged base layer output vs the PaCA output", merged, want, tol)
    if not torch.equal(bits(base.weight), stored):
        raise ContractViolation(
            f"{what}: unmerge did not restore the weight bit for bit", "write_columns"
        )


def _refused(ctx: CheckContext, dtype: torch.dtype) -> str:
    cap = DTYPE_CAPABILITIES[dtype]
    spec = L.specs()[0]
    done = []
    attempts: list[tuple[str, Any]] = [(f"a {dtype_name(dtype)} layer", None)]
    fp32 = "float32" in ctx.backend.capabilities
    if dtype != torch.float32 and fp32:
        attempts.append((f"a float32 layer under autocast({dtype_name(dtype)})", dtype))
    for label, compute in attempts:
        layer_dtype = dtype if compute is None else torch.float32
        layer = L.make_layer(ctx, spec, layer_dtype, salt=1000)
        x, g = L.layer_inputs(ctx, layer, spec, salt=1000)
        try:
            L.layer_step(layer, x, g, compute=compute)
        except BackendCapabilityError as exc:
            if ctx.backend.name not in str(exc) or cap not in str(exc):
                raise ContractViolation(
                    f"{label}: the core's BackendCapabilityError does not name the backend and "
                    f"{cap!r}: {exc}"
                ) from exc
            done.append(label)
            continue
        except RuntimeError as exc:  # autocast to this dtype unsupported on the device
            if compute is not None and "autocast" in str(exc).lower():
                continue
            raise
        raise ContractViolation(
            f"{label}: the core handed the backend {dtype_name(dtype)} tensors although it does "
            f"not declare {cap!r}"
        )
    return f"not declared: the core refuses it ({'; '.join(done)})"


def _autocast_works(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


@per_dtype(
    "dtype",
    "declared: real PaCA layers (Linear, Conv1D, Conv2d) in the dtype and under autocast vs "
    "the dense reference, with fp32 and same-dtype deltas, merge/unmerge exact; undeclared: "
    "the core refuses it with BackendCapabilityError",
    skip_undeclared=False,
)
def check_dtype(ctx: CheckContext, dtype: torch.dtype) -> str | None:
    if DTYPE_CAPABILITIES[dtype] not in ctx.backend.capabilities:
        return _refused(ctx, dtype)
    findings = Findings(ctx)
    notes = []
    master = torch.float32 if "float32" in ctx.backend.capabilities else dtype
    for n, spec in enumerate(L.specs()):
        for delta_dtype in dict.fromkeys([master, dtype]):
            what = f"{spec.label(dtype)} ({dtype_name(delta_dtype)} delta)"
            layer = L.make_layer(
                ctx, spec, dtype, salt=1100 + 10 * n, delta_dtype=dtype_name(delta_dtype)
            )
            x, g = L.layer_inputs(ctx, layer, spec, salt=1100 + 10 * n)
            with findings.member(L.FORWARD[spec.kind], what):
                got = L.layer_step(layer, x, g)
            if L.FORWARD[spec.kind] in findings.failures:
                continue
            want = L.dense_step(layer, x, g)
            L.compare_step(
                ctx, what, got, want, dtype, spec.kind, findings, delta_dtype=delta_dtype
            )
            tol = ctx.conv_tol(dtype) if spec.kind == "conv2d" else ctx.tol(dtype)
            with findings.member("write_columns", f"{what}: merge"):
                _merge_roundtrip(ctx, layer, x.to(dtype), f"{what}: merge/unmerge", tol)
            # an optimizer step updates delta in place: the next step must see the new values
            # (a backend caching anything derived from delta per layer would not)
            with torch.no_grad():
                d = layer.paca_delta["default"]
                d.add_(ctx.on_device(ctx.randn(*d.shape, salt=1190 + n)).to(d.dtype) * 0.05)
            stale = f"{what}, after an in-place update of delta (as an optimizer step makes)"
            with findings.member(L.FORWARD[spec.kind], stale):
                got = L.layer_step(layer, x, g)
            if not findings.known(L.FORWARD[spec.kind]):
                want = L.dense_step(layer, x, g)
                L.compare_step(
                    ctx, stale, got, want, dtype, spec.kind, findings, delta_dtype=delta_dtype
                )
        if dtype != torch.float32 and "float32" in ctx.backend.capabilities:
            if not _autocast_works(ctx.device, dtype):
                notes.append(f"autocast({dtype_name(dtype)}) unsupported on {ctx.device.type}")
                continue
            what = f"{spec.label(torch.float32)} under autocast({dtype_name(dtype)})"
            layer = L.make_layer(ctx, spec, torch.float32, salt=1150 + 10 * n)
            x, g = L.layer_inputs(ctx, layer, spec, salt=1150 + 10 * n)
            with findings.member(L.FORWARD[spec.kind], what):
                got = L.layer_step(layer, x, g, compute=dtype)
            if L.FORWARD[spec.kind] in findings.failures:
                continue
            want = L.dense_step(layer, x, g, compute=dtype)
            L.compare_step(ctx, what, got, want, dtype, spec.kind, findings, x_dtype=torch.float32)
    findings.raise_if_any()
    return "; ".join(notes) or None


# ------------------------------------------------------------------ write traffic
#: What a PaCA layer step may write beyond the same layer frozen, over the weight's bytes,
#: after the irreducible saved activation x_sel and d(delta).
TRAFFIC_BOUND = 0.1

#: Weight-dominant configs, as in LLM layers: (label, factory, input shape, r).
TRAFFIC_CONFIGS: list[tuple[str, str, Any, tuple[int, ...], int]] = [
    ("linear", "Linear 1024->2816, 256 rows", lambda: nn.Linear(1024, 2816), (256, 1024), 8),
    ("conv1d", "Conv1D-style 768->2304 (transposed weight), 256 rows", lambda: L.Conv1DLike(2304, 768), (2, 128, 768), 8),
    ("conv2d", "Conv2d 256->256 k3 on (2, 256, 8, 8)", lambda: nn.Conv2d(256, 256, 3, padding=1), (2, 256, 8, 8), 4),
]  # fmt: skip


def _interpreter_paused(counter: Any) -> Any:
    """Triton's interpreter copies every kernel argument to the host and back (writes a
    GPU launch never makes): count nothing inside an interpreted launch, as on a GPU,
    where a kernel's stores into existing tensors are not seen by the dispatcher either."""
    import contextlib
    import sys

    interp = sys.modules.get("triton.runtime.interpreter")
    if interp is None or not hasattr(interp, "GridExecutor"):
        return contextlib.nullcontext()
    real = interp.GridExecutor.__call__

    def paused(self: Any, *args: Any, **kwargs: Any) -> Any:
        with counter.paused():
            return real(self, *args, **kwargs)

    @contextlib.contextmanager
    def patch() -> Any:
        interp.GridExecutor.__call__ = paused
        try:
            yield
        finally:
            interp.GridExecutor.__call__ = real

    return patch()


def _phase_bytes(ctx: CheckContext, module: nn.Module, x: torch.Tensor) -> tuple[int, int, Any]:
    from paca.testing.traffic import WriteCounter

    x = x.detach().clone().requires_grad_(True)
    with WriteCounter() as fwd, _interpreter_paused(fwd):
        y = module(x)
    g = torch.ones_like(y)
    with WriteCounter() as bwd, _interpreter_paused(bwd):
        y.backward(g)
    return fwd.bytes, bwd.bytes, (fwd.by_op, bwd.by_op)


def _traffic_config(
    ctx: CheckContext,
    dtype: torch.dtype,
    kind: str,
    label: str,
    make: Any,
    shape: tuple[int, ...],
    r: int,
) -> str:
    from paca.layer import PacaLinear
    from paca.layers_conv import PacaConv1D, PacaConv2d

    torch.manual_seed(ctx.seed)
    base = make().to(device=ctx.device, dtype=dtype).requires_grad_(False)
    cls = {"linear": PacaLinear, "conv1d": PacaConv1D, "conv2d": PacaConv2d}[kind]
    layer = cls(base, ctx.backend)
    n_in = layer.in_features
    # delta in the layer's dtype (delta_dtype=None): an fp32 master delta under bf16 adds an
    # fp32 copy of grad_out on backends without an fp32-output bf16 GEMM (activation-sized)
    layer.add_adapter("default", ctx.on_device(ctx.columns(n_in, r, salt=1300)), dtype_name(dtype))
    with torch.no_grad():
        layer.paca_delta["default"].normal_(0, 0.01)
    x = ctx.on_device(ctx.randn(*shape, salt=1301)).to(dtype)
    _phase_bytes(ctx, layer, x)  # warm-up: one-time caches are not per-step traffic
    frozen_f, frozen_b, _ = _phase_bytes(ctx, base, x)
    paca_f, paca_b, by_op = _phase_bytes(ctx, layer, x)
    w_bytes = base.weight.numel() * base.weight.element_size()
    x_sel = x.numel() // n_in * r * x.element_size()
    delta = layer.paca_delta["default"]
    d_delta = delta.numel() * delta.element_size()
    extra_f, extra_b = paca_f - frozen_f, paca_b - frozen_b
    beyond = (extra_f + extra_b - x_sel - d_delta) / w_bytes
    figure = f"{label} {dtype_name(dtype)}: {beyond:.3f}"
    if beyond > TRAFFIC_BOUND:
        over_f, over_b = extra_f - x_sel, extra_b - d_delta
        member = L.FORWARD[kind] if over_f >= over_b else L.BACKWARD[kind]
        ops = by_op[0] if over_f >= over_b else by_op[1]
        top = ", ".join(f"{op} {n / w_bytes:.2f}" for op, n in ops.most_common(3))
        raise ContractViolation(
            f"{label} ({dtype_name(dtype)}): a PaCA layer step writes {beyond:.2f} x the "
            f"weight's bytes beyond the frozen layer, x_sel and d(delta) (bound "
            f"{TRAFFIC_BOUND}); forward {extra_f / w_bytes:.2f}, backward {extra_b / w_bytes:.2f} "
            f"x weight beyond frozen; largest writers (x weight bytes) in "
            f"{'forward' if member == L.FORWARD[kind] else 'backward'}: {top}. Apply the r "
            f"columns in place (swap and restore) or decompose; never copy the weight",
            member,
        )
    return figure


@contract_item(
    "traffic",
    "bytes written per PaCA layer step beyond the frozen layer <= 0.1 x weight bytes + "
    "x_sel + d(delta) (Linear, Conv1D, Conv2d; paca.testing.traffic.WriteCounter)",
)
def check_traffic(ctx: CheckContext) -> str | None:
    dtypes = [d for d in (torch.float32, torch.bfloat16) if d in ctx.declared_dtypes]
    if not dtypes:
        raise ContractSkip("declares neither float32 nor bfloat16")
    findings = Findings(ctx)
    figures = []
    for dtype in dtypes:
        configs = TRAFFIC_CONFIGS if dtype == dtypes[0] else TRAFFIC_CONFIGS[:1]
        for kind, label, make, shape, r in configs:
            member = L.FORWARD[kind]
            with findings.member(member, label):
                figures.append(_traffic_config(ctx, dtype, kind, label, make, shape, r))
    findings.raise_if_any()
    return "beyond the frozen layer, x weight bytes: " + "; ".join(figures)
