"""Items for the step hooks and the graph-mode capabilities (compile, graphs, lazy), each
exercised on a tiny PaCA model, plus the graph entry points and utilities. (``nf4`` is
in ``_checks_nf4``.)"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from paca.backend_abc import Backend
from paca.testing import _layers as L
from paca.testing._contract import (
    CheckContext,
    ContractSkip,
    ContractViolation,
    contract_item,
    expect_close,
)


class TinyPaca(nn.Module):
    """PacaConv2d -> flatten -> PacaLinear -> PacaConv1D: every layer type, tiny."""

    def __init__(self, ctx: CheckContext, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = L.make_layer(
            ctx, L.LayerSpec("conv2d", n_in=4, n_out=6, r=2, lead=(2,), hw=(5, 5)), dtype, salt=1500
        )
        self.linear = L.make_layer(
            ctx, L.LayerSpec("linear", n_in=150, n_out=16, r=5), dtype, salt=1510
        )
        self.conv1d = L.make_layer(ctx, L.LayerSpec("conv1d", n_in=16, n_out=8, r=3), dtype, salt=1520)  # fmt: skip
        self.x = ctx.on_device(ctx.randn(2, 4, 5, 5, salt=1530)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(torch.relu(self.linear(self.conv(x).flatten(1))))

    def deltas(self) -> list[nn.Parameter]:
        return [m.paca_delta["default"] for m in (self.conv, self.linear, self.conv1d)]


# ------------------------------------------------------------------ step hooks
def _hook_events(ctx: CheckContext, *, enabled: bool = True) -> list[tuple[str, bool]]:
    """Run 2 optimizer steps of 2 micro-batches each, then a no_grad forward; record hooks."""
    b = ctx.backend
    model = TinyPaca(ctx)
    params = model.deltas()
    opt = torch.optim.SGD(params, lr=0.1)
    events: list[tuple[str, bool]] = []
    bound_bwd, bound_step = b.on_backward_end, b.on_optimizer_step

    errors: list[tuple[str, BaseException]] = []

    def on_backward_end() -> None:
        events.append(("on_backward_end", all(p.grad is not None for p in params)))
        try:
            bound_bwd()
        except Exception as exc:  # noqa: BLE001 - reported below, naming the hook
            errors.append(("on_backward_end", exc))

    def on_optimizer_step() -> None:
        events.append(("on_optimizer_step", True))
        try:
            bound_step()
        except Exception as exc:  # noqa: BLE001
            errors.append(("on_optimizer_step", exc))

    old_enabled = b.step_hooks_enabled
    own_attr = "step_hooks_enabled" in vars(b)
    with (
        L.replaced(b, "on_backward_end", on_backward_end),
        L.replaced(b, "on_optimizer_step", on_optimizer_step),
    ):
        b.step_hooks_enabled = enabled
        try:
            for _ in range(2):
                for _ in range(2):  # gradient accumulation: two backward passes per step
                    model(model.x).square().sum().backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                model(model.x)  # inference: no boundary
        finally:
            if own_attr:
                b.step_hooks_enabled = old_enabled
            else:
                vars(b).pop("step_hooks_enabled", None)
    if errors:
        hook, exc = errors[0]
        raise ContractViolation(
            f"raised {type(exc).__name__}: {exc} when the core called it in a training loop", hook
        )
    return events


_WANT = ([("on_backward_end", True)] * 2 + [("on_optimizer_step", True)]) * 2


def _expect_hook_calls(ctx: CheckContext) -> None:
    events = _hook_events(ctx)
    if events != _WANT:
        raise ContractViolation(
            f"for 2 x (2 x (forward through 3 PaCA layers, backward), optimizer.step) then a "
            f"no_grad forward, expected {[e for e, _ in _WANT]} with every gradient ready at "
            f"on_backward_end; got {events}",
            "wants_step_hooks",
        )
    if _hook_events(ctx, enabled=False):
        raise ContractViolation(
            "with step_hooks_enabled = False (something else marks the steps) the hooks were "
            "still called",
            "step_hooks_enabled",
        )


@contract_item(
    "step_hooks",
    "with wants_step_hooks: on_backward_end once per backward (gradients ready), "
    "on_optimizer_step once per step, none for no_grad or with step_hooks_enabled = False; "
    "without it: never called",
)
def check_step_hooks(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if not b.wants_step_hooks:
        events = _hook_events(ctx)
        if events:
            raise ContractViolation(
                f"is False but the hooks were called: {events}", "wants_step_hooks"
            )
        return "wants_step_hooks is False: no hooks installed"
    _expect_hook_calls(ctx)
    return "2 backward and 1 step mark per step, as expected"


@contract_item(
    "lazy",
    "capability 'lazy': wants_step_hooks is True, on_backward_end/on_optimizer_step are "
    "implemented, and a real training loop calls each once per backward / optimizer step",
)
def check_lazy(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if "lazy" not in b.capabilities:
        raise ContractSkip("backend does not declare the 'lazy' capability")
    if not b.wants_step_hooks:
        raise ContractViolation(
            "is False although the backend declares 'lazy': the core never calls the step "
            "hooks, so a lazy-mode device never marks steps",
            "wants_step_hooks",
        )
    for hook in ("on_backward_end", "on_optimizer_step"):
        impl = getattr(type(b), hook, None)
        if impl is getattr(Backend, hook):
            raise ContractViolation(
                "is the Backend default (does nothing) although the backend declares 'lazy': "
                "nothing marks the step boundary",
                hook,
            )
    _expect_hook_calls(ctx)
    return "step marks at every backward and optimizer step"


# ------------------------------------------------------------------ compile
_FRAME = re.compile(r"in (\w+)\n")


def _blame_frames(text: str, exc: BaseException | None = None) -> str | None:
    """The innermost Backend member in a traceback (dynamo's text, or ``exc``'s frames)."""
    import traceback

    members = {n for n in dir(Backend) if not n.startswith("_")}
    names = _FRAME.findall(text + "\n")
    if exc is not None:
        names += [f.name for f in traceback.extract_tb(exc.__traceback__)]
    hits = [m for m in names if m in members]
    return hits[-1] if hits else None


@contract_item(
    "compile",
    "capability 'compile': torch.compile(fullgraph=True) of a tiny PaCA model (Conv2d, "
    "Linear, Conv1D) gives one graph, no graph breaks, and eager's results",
)
def check_compile(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if "compile" not in b.capabilities:
        raise ContractSkip("backend does not declare the 'compile' capability")
    if not ctx.run_compile:
        raise ContractSkip("compile checks switched off (run_compile=False)")
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend

    model = TinyPaca(ctx)

    def run(fn: Any) -> list[torch.Tensor]:
        x = model.x.detach().clone().requires_grad_(True)
        for p in model.deltas():
            p.grad = None
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in model.deltas())]

    want = run(model)  # eager first, as a model's first step would be
    chosen = b.compile_backend() or "aot_eager"  # aot_eager: traces backward, cheaply
    graphs = []

    def counting(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return lookup_backend(chosen)(gm, example_inputs)

    torch._dynamo.reset()
    try:
        try:
            got = run(torch.compile(model, backend=counting, fullgraph=True))
        except Exception as exc:  # a graph break under fullgraph=True, or a tracing error
            text = str(exc)
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise ContractViolation(
                f"torch.compile(fullgraph=True) of a tiny PaCA model failed: "
                f"{type(exc).__name__}: {first} (backend code that dynamo traces must not "
                f"graph-break: no .item(), data-dependent Python control flow, print or "
                f"unsupported calls)",
                _blame_frames(text),
            ) from exc
    finally:
        torch._dynamo.reset()
    if len(graphs) != 1:
        raise ContractViolation(
            f"torch.compile of the tiny PaCA model gave {len(graphs)} graphs, expected 1"
        )
    labels = ("output", "input gradient", "conv delta gradient", "linear delta gradient",
              "conv1d delta gradient")  # fmt: skip
    for label, g, w in zip(labels, got, want, strict=True):
        expect_close(f"compiled ({chosen}) {label} vs eager", g, w, ctx.conv_tol(torch.float32))
    return f"1 graph, 0 graph breaks, compiled with {chosen!r}"


# ------------------------------------------------------------------ graphs
def _cuda_graph_replay(ctx: CheckContext) -> str:
    model = TinyPaca(ctx)
    params = model.deltas()
    static_x = model.x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch's docs require
        for _ in range(2):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_loss = model(static_x).square().mean()
            static_loss.backward()
    except Exception as exc:
        raise ContractViolation(
            f"CUDA graph capture of a PaCA model's forward and backward failed: "
            f"{type(exc).__name__}: {exc} (no host synchronization, no new allocations "
            f"outside torch's allocator, no CPU tensors inside the ops)",
            _blame_frames("", exc),
        ) from exc
    for step in range(2):
        static_x.copy_(ctx.on_device(ctx.randn(*static_x.shape, salt=1600 + step)))
        graph.replay()
        captured = [static_loss.detach().clone(), *(p.grad.detach().clone() for p in params)]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss = model(static_x).square().mean()
        loss.backward()
        eager = [loss.detach(), *(p.grad for p in params)]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        for n, (a, e) in enumerate(zip(captured, eager, strict=True)):
            label = "loss" if n == 0 else f"delta gradient of layer {n}"
            expect_close(
                f"CUDA graph replay {step}: {label} vs eager", a, e, ctx.conv_tol(torch.float32)
            )
    return "CUDA graph capture of forward and backward replays like eager"


def _hpu_graph_replay(ctx: CheckContext) -> str:
    try:
        import habana_frameworks.torch.hpu as hthpu
    except ImportError as exc:
        raise ContractViolation(
            f"declares 'graphs' on device type 'hpu' but habana_frameworks.torch.hpu cannot be "
            f"imported ({exc}); HPU graphs are exercised with its wrap_in_hpu_graph",
            "capabilities",
        ) from exc
    model = TinyPaca(ctx).eval()
    inputs = [ctx.on_device(ctx.randn(*model.x.shape, salt=1650 + n)) for n in range(2)]
    with torch.no_grad():
        want = [model(x).clone() for x in inputs]
        graphed = hthpu.wrap_in_hpu_graph(model)
        got = [graphed(x).clone() for x in inputs]
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        expect_close(
            f"HPU graph (wrap_in_hpu_graph) call {n} vs eager", g, w, ctx.conv_tol(torch.float32)
        )
    return "HPU graphs (wrap_in_hpu_graph) of a PaCA model replay like eager"


@contract_item(
    "graphs",
    "capability 'graphs': CUDA graph capture of forward+backward (cuda), or HPU graphs "
    "(wrap_in_hpu_graph, hpu), replays like eager",
)
def check_graphs(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if "graphs" not in b.capabilities:
        raise ContractSkip("backend does not declare the 'graphs' capability")
    kind = b.device_type
    if kind == "hpu":
        return _hpu_graph_replay(ctx)
    if kind == "cuda":
        if ctx.device.type != "cuda":
            raise ContractSkip(
                f"'graphs' (CUDA graph capture) can only be exercised on a CUDA device; this "
                f"run checks on {ctx.device}: run the suite on a GPU to check it"
            )
        return _cuda_graph_replay(ctx)
    raise ContractSkip(
        f"'graphs' cannot be exercised here: the suite captures CUDA graphs (device type "
        f"'cuda') and HPU graphs ('hpu'), not graphs on device type {kind!r}"
    )


# ------------------------------------------------------------------ entry points, utilities
@contract_item(
    "graph_entry_points",
    "compile_backend() is None or a registered torch.compile backend; prepare_for_inference "
    "returns a module computing the same outputs",
)
def check_graph_entry_points(ctx: CheckContext) -> str | None:
    b = ctx.backend
    name = b.compile_backend()
    if name is not None:
        import torch._dynamo as dynamo  # slow to import: only when there is a name to check

        if not isinstance(name, str):
            raise ContractViolation(f"returned {name!r}; return a str or None", "compile_backend")
        known = dynamo.list_backends(exclude_tags=())
        if name not in known:
            raise ContractViolation(
                f"returned {name!r}, which is not a registered torch.compile backend (known: "
                f"{', '.join(known)}); import the module that registers it inside "
                f"compile_backend()",
                "compile_backend",
            )
    model = TinyPaca(ctx)
    model.eval()
    with torch.no_grad():
        want = model(model.x).clone()
        prepared = b.prepare_for_inference(model)
        if not isinstance(prepared, nn.Module):
            raise ContractViolation(
                f"returned {type(prepared).__name__}, not an nn.Module", "prepare_for_inference"
            )
        got = prepared(model.x).clone()
    try:
        expect_close("prepare_for_inference() model output", got, want, ctx.conv_tol(torch.float32))
    except ContractViolation as exc:
        raise ContractViolation(str(exc), "prepare_for_inference") from exc
    return f"compile_backend() = {name!r}"


@contract_item(
    "utilities",
    "synchronize() returns None; memory counters return None or ints >= 0, peak >= current",
)
def check_utilities(ctx: CheckContext) -> str | None:
    b = ctx.backend
    if b.synchronize() is not None:
        raise ContractViolation("must return None", "synchronize")
    b.reset_peak_memory()
    keep = ctx.on_device(torch.zeros(1024))
    b.synchronize()
    now, peak = b.memory_allocated(), b.max_memory_allocated()
    for label, v in (("memory_allocated", now), ("max_memory_allocated", peak)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ContractViolation(f"returned {v!r}; return None or bytes as an int >= 0", label)
    if now is not None and peak is not None and peak < now:
        raise ContractViolation(f"{peak} < memory_allocated() {now}", "max_memory_allocated")
    del keep
    return "memory not reported" if now is None else f"{now} bytes allocated"
