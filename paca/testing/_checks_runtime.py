"""Contract items about the backend as an object: declared facts, discovery behaviour,
step hooks, graph-mode entry points and the timing/memory utilities."""

from __future__ import annotations

import copy
import json
import pickle
import re
from typing import Any

import torch
from torch import nn

from paca.backend_abc import BACKEND_API_VERSION, KNOWN_CAPABILITIES, Backend
from paca.testing._checks_primitives import IN, OUT, R
from paca.testing._contract import (
    CheckContext,
    ContractSkip,
    ContractViolation,
    contract_item,
    expect_close,
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@contract_item("api", "declares name, device_type, api_version, priority and capabilities")
def check_api(ctx: CheckContext) -> str | None:
    b = ctx.backend
    cls = type(b)
    if not isinstance(b, Backend):
        raise ContractViolation(f"{cls.__name__} is not a paca.backend_abc.Backend subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ContractViolation(
            f"name {name!r} must be a lower-case string without spaces (users type it)"
        )
    if cls.api_version != BACKEND_API_VERSION:
        raise ContractViolation(
            f"api_version is {cls.api_version!r} but this paca speaks backend API "
            f"v{BACKEND_API_VERSION}; port the backend and set api_version = {BACKEND_API_VERSION}"
        )
    try:
        torch.device(cls.device_type)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ContractViolation(
            f"device_type {cls.device_type!r} is not a torch device type: {exc}"
        ) from exc
    if cls.priority is not None and not isinstance(cls.priority, int):
        raise ContractViolation(f"priority must be an int or None, not {cls.priority!r}")
    caps = cls.capabilities
    if not isinstance(caps, (frozenset, set)) or not all(isinstance(c, str) for c in caps):
        raise ContractViolation(f"capabilities must be a frozenset of strings, not {caps!r}")
    unknown = sorted(set(caps) - KNOWN_CAPABILITIES)
    if unknown:
        raise ContractViolation(
            f"unknown capabilities {unknown}; known names are {sorted(KNOWN_CAPABILITIES)} "
            f"(a misspelt capability silently disables the checks that need it)"
        )
    if not isinstance(cls.wants_step_hooks, bool):
        raise ContractViolation(f"wants_step_hooks must be a bool, not {cls.wants_step_hooks!r}")
    return f"api v{cls.api_version}, capabilities {sorted(caps)}"


@contract_item(
    "availability",
    "is_available() never raises and returns a bool; unavailable_reason() says why; describe()",
)
def check_availability(ctx: CheckContext) -> str | None:
    cls = type(ctx.backend)
    try:
        first, second = cls.is_available(), cls.is_available()
    except Exception as exc:
        raise ContractViolation(
            f"is_available() raised {type(exc).__name__}: {exc}; it must return False instead "
            f"(check for vendor SDKs with importlib.util.find_spec, catch their errors)"
        ) from exc
    if not isinstance(first, bool) or first != second:
        raise ContractViolation(
            f"is_available() must return the same bool on every call, got {first!r} then {second!r}"
        )
    try:
        reason = cls.unavailable_reason()
    except Exception as exc:
        raise ContractViolation(f"unavailable_reason() raised {type(exc).__name__}: {exc}") from exc
    if first and reason is not None:
        raise ContractViolation(
            f"available, but unavailable_reason() returned {reason!r}, not None"
        )
    if not first and not (isinstance(reason, str) and reason.strip()):
        raise ContractViolation(
            "unavailable, but unavailable_reason() gave no reason; return a sentence that "
            "says what to install or attach"
        )
    if not ctx.constructed:  # unavailable here: instance methods may need the device
        return f"unavailable: {reason}"
    try:
        facts = ctx.backend.describe()
    except Exception as exc:
        raise ContractViolation(f"describe() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(facts, dict) or facts.get("backend") != cls.name:
        raise ContractViolation(
            f"describe() must return a dict with 'backend': {cls.name!r}; got {facts!r}"
        )
    try:
        json.dumps(facts, default=str)
    except (TypeError, ValueError) as exc:
        raise ContractViolation(f"describe() is not JSON-serialisable: {exc}") from exc
    dev = ctx.backend.device()
    if not isinstance(dev, torch.device):
        raise ContractViolation(f"device() returned {dev!r}, not a torch.device")
    if dev.type != cls.device_type:  # allowed (simulators, fake SDKs), but worth seeing
        return f"device() is {dev.type!r} while device_type is {cls.device_type!r}"
    return None


@contract_item(
    "registration", "the registry returns this backend by name; deepcopy/pickle keep the singleton"
)
def check_registration(ctx: CheckContext) -> str | None:
    from paca._registry import registry

    b = ctx.backend
    if not ctx.registered:
        raise ContractSkip("backend instance was passed directly, not looked up by name")
    got = registry().instance(b.name)
    if got is not b:
        raise ContractViolation(
            f"registry().instance({b.name!r}) returned {got!r}, not the backend under test; "
            f"is the name also used by another plugin?"
        )
    if copy.deepcopy(b) is not b:
        raise ContractViolation("copy.deepcopy(backend) must return the backend itself")
    if pickle.loads(pickle.dumps(b)) is not b:
        raise ContractViolation("unpickling a backend must give the registered instance back")
    return None


def _tiny_paca_model(ctx: CheckContext) -> tuple[nn.Module, list[nn.Parameter], torch.Tensor]:
    """Two stacked PaCA linears on the backend's device, with non-zero deltas."""
    from paca.layer import PacaLinear

    layers = []
    params = []
    for n, (i, o) in enumerate([(IN, OUT), (OUT, IN)]):
        base = nn.Linear(i, o)
        with torch.no_grad():
            base.weight.copy_(ctx.randn(o, i, salt=n) * i**-0.5)
            base.bias.copy_(ctx.randn(o, salt=10 + n))
        layer = PacaLinear(base.to(ctx.device).requires_grad_(False), ctx.backend)
        layer.add_adapter("default", ctx.on_device(ctx.columns(i, R, salt=n)), "float32")
        with torch.no_grad():
            layer.paca_delta["default"].copy_(ctx.on_device(ctx.randn(o, R, salt=20 + n) * 0.05))
        layers.append(layer)
        params.append(layer.paca_delta["default"])
    x = ctx.on_device(ctx.randn(4, IN, salt=30))
    return nn.Sequential(*layers), params, x


@contract_item(
    "step_hooks",
    "on_backward_end once per backward (grads ready), on_optimizer_step once per step",
)
def check_step_hooks(ctx: CheckContext) -> str | None:
    b = ctx.backend
    model, params, x = _tiny_paca_model(ctx)
    opt = torch.optim.SGD(params, lr=0.1)
    events: list[tuple[str, Any]] = []
    originals = {k: b.__dict__.get(k) for k in ("on_backward_end", "on_optimizer_step")}
    bound_bwd, bound_step = b.on_backward_end, b.on_optimizer_step

    def on_backward_end() -> None:
        events.append(("on_backward_end", all(p.grad is not None for p in params)))
        bound_bwd()

    def on_optimizer_step() -> None:
        events.append(("on_optimizer_step", True))
        bound_step()

    b.on_backward_end = on_backward_end  # type: ignore[method-assign]
    b.on_optimizer_step = on_optimizer_step  # type: ignore[method-assign]
    try:
        for _ in range(2):
            model(x).square().sum().backward()  # two PaCA layers, one backward
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            model(x)  # inference: no boundary
    finally:
        for k, v in originals.items():
            if v is None:
                b.__dict__.pop(k, None)
            else:
                b.__dict__[k] = v
    if not b.wants_step_hooks:
        if events:
            raise ContractViolation(
                f"wants_step_hooks is False but the hooks were called: {events}"
            )
        return "wants_step_hooks is False: no hooks installed"
    want = [("on_backward_end", True), ("on_optimizer_step", True)] * 2
    if events != want:
        raise ContractViolation(
            f"for 2 x (forward through 2 PaCA layers, backward, optimizer.step) then one "
            f"no_grad forward, expected calls {[e for e, _ in want]} with all gradients "
            f"ready at on_backward_end; got {events}"
        )
    return None


@contract_item(
    "graph_entry_points",
    "compile_backend() is None or a registered torch.compile backend; prepare_for_inference",
)
def check_graph_entry_points(ctx: CheckContext) -> str | None:
    b = ctx.backend
    name = b.compile_backend()
    if name is not None:
        import torch._dynamo as dynamo  # slow to import: only when there is a name to check

        if not isinstance(name, str):
            raise ContractViolation(f"compile_backend() returned {name!r}; return a str or None")
        known = dynamo.list_backends(exclude_tags=())
        if name not in known:
            raise ContractViolation(
                f"compile_backend() returned {name!r}, which is not a registered torch.compile "
                f"backend (known: {', '.join(known)}); import the module that registers it "
                f"inside compile_backend()"
            )
    model, _, x = _tiny_paca_model(ctx)
    model.eval()
    with torch.no_grad():
        want = model(x)
        prepared = b.prepare_for_inference(model)
        if not isinstance(prepared, nn.Module):
            raise ContractViolation(
                f"prepare_for_inference() returned {type(prepared).__name__}, not an nn.Module"
            )
        got = prepared(x)
    expect_close("prepare_for_inference() model output", got, want, ctx.tol(torch.float32))
    return f"compile_backend() = {name!r}"


@contract_item("compile", "capability 'compile': the PaCA op compiles with no graph breaks")
def check_compile(ctx: CheckContext) -> str | None:
    import torch._dynamo

    from paca.ops import paca_linear

    b = ctx.backend
    if "compile" not in b.capabilities:
        raise ContractSkip("backend does not declare the 'compile' capability")
    if not ctx.run_compile:
        raise ContractSkip("compile checks switched off (run_compile=False)")
    w = ctx.on_device(ctx.randn(OUT, IN) * IN**-0.5)
    bias = ctx.on_device(ctx.randn(OUT, salt=1))
    idx = ctx.on_device(ctx.columns(IN, R))

    def fn(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return paca_linear(x, w, bias, delta, idx, b)

    def run(f):
        x = ctx.on_device(ctx.randn(3, 5, IN, salt=2)).requires_grad_(True)
        delta = ctx.on_device(ctx.randn(OUT, R, salt=3) * 0.05).requires_grad_(True)
        y = f(x, delta)
        y.square().sum().backward()
        return y.detach(), x.grad, delta.grad

    want = run(fn)  # eager first, as a model's first step would be
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(fn)(
            ctx.on_device(ctx.randn(3, 5, IN, salt=2)),
            ctx.on_device(ctx.randn(OUT, R, salt=3)).requires_grad_(True),
        )
        if explained.graph_count != 1 or explained.graph_break_count != 0:
            reasons = "; ".join(str(r.reason) for r in explained.break_reasons[:3])
            raise ContractViolation(
                f"torch.compile of the PaCA op gave {explained.graph_count} graph(s) and "
                f"{max(explained.graph_break_count, 0)} graph break(s), expected 1 graph and no "
                f"break{': ' + reasons if reasons else ' (dynamo skipped the frame)'}"
            )
        chosen = b.compile_backend() or "aot_eager"  # aot_eager: traces backward, cheaply
        compiled = torch.compile(fn, backend=chosen, fullgraph=True)
        got = run(compiled)
    finally:
        torch._dynamo.reset()
    tol = ctx.tol(torch.float32)
    for label, g, w_ in zip(("output", "input gradient", "delta gradient"), got, want, strict=True):
        expect_close(f"compiled ({chosen}) {label} vs eager", g, w_, tol)
    return f"0 graph breaks; compiled with {chosen!r}"


@contract_item(
    "utilities", "synchronize() and the memory counters return None or sensible integers"
)
def check_utilities(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if b.synchronize() is not None:
        raise ContractViolation("synchronize() must return None")
    b.reset_peak_memory()
    keep = ctx.on_device(torch.zeros(1024))
    b.synchronize()
    now, peak = b.memory_allocated(), b.max_memory_allocated()
    for label, v in (("memory_allocated()", now), ("max_memory_allocated()", peak)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ContractViolation(f"{label} returned {v!r}; return None or bytes as an int >= 0")
    if now is not None and peak is not None and peak < now:
        raise ContractViolation(f"max_memory_allocated() {peak} < memory_allocated() {now}")
    del keep
    return "memory not reported" if now is None else f"{now} bytes allocated"


@contract_item(
    "weight_cache",
    "with the per-step effective-weight cache on, training matches the uncached path",
)
def check_weight_cache(ctx: CheckContext) -> str | None:
    try:
        from paca import weight_cache
    except ImportError as exc:  # an older paca core without the cache
        raise ContractSkip(f"this paca has no effective-weight cache ({exc})") from exc

    def train(cache: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        model, params, x = _tiny_paca_model(ctx)
        opt = torch.optim.SGD(params, lr=0.1)
        with weight_cache.enabled(cache):
            for _ in range(2):
                model(x).square().sum().backward()  # forward + backward reuse one W_eff
                opt.step()  # the cache must notice delta changed and rewrite its columns
                opt.zero_grad()
            with torch.no_grad():
                out = model(x)
        weight_cache.clear()
        return [p.detach().clone() for p in params], out

    weight_cache.reset_stats()
    got_params, got_out = train(True)
    stats = weight_cache.stats()
    want_params, want_out = train(False)
    tol = ctx.tol(torch.float32)
    for n, (g, w) in enumerate(zip(got_params, want_params, strict=True)):
        expect_close(f"weight cache: delta of layer {n} after 2 steps", g, w, tol)
    expect_close("weight cache: output after 2 steps", got_out, want_out, tol)
    if stats.hits + stats.column_writes + stats.rebuilds == 0:
        raise ContractViolation("weight cache: enabled, but the cache was never used")
    return f"{stats.hits} hits, {stats.column_writes} column writes, {stats.rebuilds} rebuilds"
