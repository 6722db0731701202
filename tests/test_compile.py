"""The PaCA op under torch.compile: a registered custom op, zero graph breaks.

Runs on CPU (backend="aot_eager": AOTAutograd traces forward and backward through the
op's fake implementation and autograd formula, which is what graph mode needs; inductor
codegen is not the point here). The GPU variant (inductor + CUDA graphs) is marked cuda.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import paca
from paca.ops import backend_key


def _model(backend: str | paca.Backend = "cpu", move: bool = True) -> paca.PacaModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    model = paca.wrap(
        net, paca.PacaConfig(r=4, target_modules=["0", "2"]), backend=backend, move_to_device=move
    )
    for _, layer in model.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.1)
    return model


def _opcheck_args(compute: torch.dtype | None, bias: bool):
    from paca_cpu import CPUBackend

    key = backend_key(CPUBackend())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g)
    b = torch.randn(8, generator=g, requires_grad=True) if bias else None
    delta = torch.randn(8, 4, generator=g, requires_grad=True)
    idx = torch.tensor([3, 0, 9, 14])
    return (x, w, b, delta, idx, key, compute)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("compute", "bias"), [(None, True), (torch.bfloat16, False)], ids=["fp32-bias", "bf16-nobias"]
)
def test_custom_ops_pass_opcheck(compute, bias):
    args = _opcheck_args(compute, bias)
    # full opcheck (schema, fake tensor, autograd registration, AOT dispatch) for the op
    # users call; the backward ops are checked without autograd (no double backward)
    torch.library.opcheck(torch.ops.paca.linear.default, args)
    x, w, _, delta, idx, key, _ = args
    g = torch.randn(3, 5, 8)
    quick = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.paca.linear_backward.default,
        (g, x.detach()[..., idx], w, delta.detach(), idx, key, True, True),
        test_utils=quick,
    )


@pytest.mark.parametrize("compute", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_path_and_custom_op_compute_the_same(compute):
    """Eager mode skips the custom-op dispatcher (host overhead); results must not differ."""
    args = _opcheck_args(compute, bias=True)
    x, w, b, delta, idx, key, _ = args
    g = torch.randn(3, 5, 8)
    y_op = torch.ops.paca.linear(*args)[0]
    grads_op = torch.autograd.grad(y_op, (x, b, delta), g.to(y_op.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute is not None):
        y = paca.ops.paca_linear(x, w, b, delta, idx, paca.ops.backend_for_key(key))
    grads = torch.autograd.grad(y, (x, b, delta), g.to(y.dtype))
    assert torch.equal(y, y_op)
    for a, e in zip(grads, grads_op, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)


def test_compiled_model_has_no_graph_breaks_and_matches_eager():
    model = _model()
    compiled_model = copy.deepcopy(model)
    x = torch.randn(4, 7, 32)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(compiled_model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert sum("paca.linear" in op for op in ops) == 2, ops  # one opaque node per PaCA layer

    torch._dynamo.reset()
    fn = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    yc = fn(xc)
    ye = model(xe)
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ye)
    yc.backward(g)
    ye.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-6)
    for (_, a), (_, b) in zip(compiled_model.paca_layers(), model.paca_layers(), strict=True):
        da, db = a.paca_delta["default"].grad, b.paca_delta["default"].grad
        torch.testing.assert_close(da, db, rtol=1e-6, atol=1e-6)

    # autocast inside the compiled region: bf16 compute, fp32 delta grads, still no breaks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = fn(x)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ye.detach(), rtol=0.05, atol=0.05)


def _break_reasons(explained) -> list[str]:
    """Graph-break reasons without object addresses (they differ between two traces)."""
    return [re.sub(r"0x[0-9a-f]+", "0x?", r.reason) for r in explained.break_reasons]


@pytest.mark.slow
def test_tiny_llama_traces_as_one_graph_with_an_opaque_node_per_paca_layer():
    """No graph break at a PaCA layer: the wrapped model breaks exactly where the plain
    model does (nowhere on transformers 5.x; transformers 4.55 breaks inside its own
    code, in ``inspect`` signature introspection), and every layer is one opaque op node."""
    from paca.tiny.models import tiny_llama

    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 100, (2, 16))
    torch._dynamo.reset()
    plain = torch._dynamo.explain(tiny_llama())(input_ids=ids, labels=ids)
    model = paca.wrap(tiny_llama(), paca.PacaConfig(r=4, target_modules=projections))
    n_layers = sum(1 for _ in model.paca_layers())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == plain.graph_break_count, explained.break_reasons
    assert explained.graph_count == plain.graph_count
    assert _break_reasons(explained) == _break_reasons(plain)
    import paca_cpu

    ours = tuple(f"{Path(m.__file__).parent}{os.sep}" for m in (paca, paca_cpu))
    for reason in explained.break_reasons:  # none of them is raised in PaCA's code
        frames = [f.filename for f in reason.user_stack]
        assert not any(f.startswith(ours) for f in frames), (reason.reason, frames)
    nodes = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert sum(t.startswith("paca.linear") for t in nodes) == n_layers > 0


def test_first_sight_of_a_backend_inside_compile_says_what_to_do():
    from paca_cpu import CPUBackend

    fresh = CPUBackend()
    lin = nn.Linear(8, 4).requires_grad_(False)
    delta = torch.zeros(4, 2, requires_grad=True)
    idx = torch.tensor([1, 5])

    def f(x):
        return paca.ops.paca_linear(x, lin.weight, lin.bias, delta, idx, fresh)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="first seen inside torch.compile"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.randn(2, 8))
    backend_key(fresh)  # what the message asks for (PaCA layers do it when built)
    torch._dynamo.reset()
    torch.compile(f, backend="eager", fullgraph=True)(torch.randn(2, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inductor_with_cuda_graphs_matches_eager_on_gpu(dtype):
    """mode="reduce-overhead" = inductor + CUDA graph trees: the op must be capture-safe."""
    model = _model("cuda").to(dtype)
    compiled_model = copy.deepcopy(model)
    fn = torch.compile(compiled_model, mode="reduce-overhead", fullgraph=True)
    params = [p for p in compiled_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ref_params = [p for p in model.parameters() if p.requires_grad]
    ref_opt = torch.optim.SGD(ref_params, lr=0.1)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    for step in range(4):  # replays after the first calls; deltas change in between
        x = torch.randn(8, 32, device="cuda", dtype=dtype, generator=None)
        y = fn(x)
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        y_ref = model(x)
        y_ref.float().square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(y, y_ref, **tol, msg=f"step {step}")
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, **tol)
