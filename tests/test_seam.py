"""Backend API v2: the PaCA op at the frozen-base limit.

* write traffic: a PaCA layer step writes no weight-sized tensor; what it writes beyond
  the same layer frozen is a small fraction of the weight's bytes (Linear, Conv1D,
  Conv2d; fp32 and bf16; the CPU backend and the CUDA backend's paths on CPU tensors);
* the pretrained weight is bit-exact whenever no PaCA op runs (after forward, backward,
  optimizer steps and an exception inside the op), and autograd's version counter of
  the weight is untouched, so other ops that saved it stay valid;
* no call sees stale columns (optimizer steps with foreach and fused AdamW, gradient
  accumulation, checkpoint recompute, load_state_dict, eval, disable_adapter);
* capabilities and the runtime contract: undeclared dtypes are refused naming the
  backend and capability; a backend returning the wrong thing is named with its member.
"""

from __future__ import annotations

import copy

import pytest
import torch
from paca_cpu import CPUBackend
from torch import nn
from transformers.pytorch_utils import Conv1D

import paca
from paca.backend_abc import BackendCapabilityError, BackendContractError
from paca.testing.traffic import WriteCounter

#: What a PaCA layer step may write beyond the same layer frozen, over the weight's
#: bytes, after subtracting the irreducible saved activation x_sel and d(delta).
BOUND = 0.1

LAYERS = {
    # name: (layer factory, input shape, r): weight-dominant configs, as in LLM layers
    "linear": (lambda: nn.Linear(1024, 2816), (256, 1024), 8),
    "conv1d": (lambda: Conv1D(2304, 768), (2, 128, 768), 8),
    "conv2d": (lambda: nn.Conv2d(256, 256, 3, padding=1), (2, 256, 8, 8), 4),
}


def _backends() -> dict[str, object]:
    from paca_cuda import CUDABackend

    return {"cpu": CPUBackend(), "cuda-torch": CUDABackend(kernels="torch")}


def _step(module: nn.Module, x: torch.Tensor) -> None:
    y = module(x)
    y.backward(torch.ones_like(y))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _extra_fraction(kind: str, dtype: torch.dtype, backend) -> tuple[float, float]:
    make, shape, r = LAYERS[kind]
    torch.manual_seed(0)
    base = make().to(dtype).requires_grad_(False)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    with WriteCounter() as frozen:
        _step(base, x)
    model = paca.wrap(
        nn.Sequential(copy.deepcopy(base)),
        paca.PacaConfig(r=r, target_modules=["0"], delta_dtype=None),
        backend=backend,
        move_to_device=False,
    )
    layer = model.model[0]
    with torch.no_grad():
        layer.paca_delta["default"].normal_(0, 0.01)
    x2 = x.detach().clone().requires_grad_(True)
    with WriteCounter() as counted:
        _step(model, x2)
    delta = layer.paca_delta["default"]
    x_sel_elems = x.numel() // layer.in_features * r
    irreducible = x_sel_elems * x.element_size() + _nbytes(delta)
    w_bytes = _nbytes(base.weight)
    extra = counted.bytes - frozen.bytes
    return extra / w_bytes, (extra - irreducible) / w_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("backend_name", ["cpu", "cuda-torch"])
def test_a_paca_layer_step_writes_almost_nothing_beyond_the_frozen_layer(kind, dtype, backend_name):
    total, beyond_irreducible = _extra_fraction(kind, dtype, _backends()[backend_name])
    assert beyond_irreducible <= BOUND, (kind, dtype, total)
    assert total <= BOUND + 0.05, (kind, dtype, total)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_triton_column_kernel_keeps_the_bound(kind, monkeypatch):
    from paca_cuda import CUDABackend, kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not kernels.triton_installed():
        pytest.skip("triton is not installed")
    backend = CUDABackend(kernels="triton")
    k = kernels.load()
    # The interpreter copies every tensor argument to the host and back around a launch
    # (a whole-weight write a GPU launch does not make): count what each kernel stores.
    for fn, written in (
        (
            "write_effective_columns",
            lambda dst, w, idx, d: w.shape[0] * idx.numel() * dst.element_size(),
        ),
        ("gather_columns", lambda x, idx: x.shape[0] * idx.numel() * x.element_size()),
    ):
        real = getattr(k, fn)

        def counted(*a, _real=real, _fn=fn, _written=written):
            mode = torch.utils._python_dispatch._get_current_dispatch_mode()
            if not isinstance(mode, WriteCounter):
                return _real(*a)
            with mode.paused():
                out = _real(*a)
            mode.add(_written(*a), _fn)
            return out

        monkeypatch.setattr(k, fn, counted)
    # smaller layers: the interpreter is slow, and the bound is a ratio
    monkeypatch.setitem(LAYERS, "linear", (lambda: nn.Linear(512, 1024), (64, 512), 4))
    monkeypatch.setitem(LAYERS, "conv1d", (lambda: Conv1D(1024, 512), (2, 32, 512), 4))
    total, beyond = _extra_fraction(kind, torch.float32, backend)
    assert beyond <= BOUND, total


# ------------------------------------------------------------------ W bit-exact at rest
def _model(kind: str = "linear", backend=None, dtype=torch.float32) -> paca.PacaModel:
    torch.manual_seed(0)
    layers = {
        "linear": lambda: nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 8)),
        "conv1d": lambda: nn.Sequential(Conv1D(32, 24), nn.GELU(), Conv1D(8, 32)),
    }
    net = layers[kind]().to(dtype)
    model = paca.wrap(
        net,
        paca.PacaConfig(r=5, target_modules=["0", "2"], seed=1),
        backend=backend or CPUBackend(),
        move_to_device=False,
    )
    for _, layer in model.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.2)
    return model


def _weights(model: paca.PacaModel) -> list[torch.Tensor]:
    return [layer.base_layer.weight.detach().clone() for _, layer in model.paca_layers()]


def _assert_bit_exact(model: paca.PacaModel, before: list[torch.Tensor]) -> None:
    for (name, layer), w in zip(model.paca_layers(), before, strict=True):
        assert torch.equal(layer.base_layer.weight, w), f"{name}: base weight changed"


def _dense_reference(model: paca.PacaModel, x: torch.Tensor) -> torch.Tensor:
    """The model's output computed with dense W_eff copies (the definition of correct)."""
    ref = copy.deepcopy(model).unload()
    for (_name, layer), (_, ref_layer) in zip(
        model.paca_layers(),
        ((n, ref.get_submodule(n)) for n, _ in model.paca_layers()),
        strict=True,
    ):
        w_oi = layer.weight_oi().detach()
        eff = w_oi.clone()
        idx = layer.paca_idx[layer.active_adapter]
        eff[:, idx] = (w_oi[:, idx].float() + layer.paca_delta[layer.active_adapter].float()).to(
            eff.dtype
        )
        with torch.no_grad():
            layer.oi_view(ref_layer.weight).copy_(eff)
    with torch.no_grad():
        return ref(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_base_weight_is_bit_exact_after_forward_backward_and_optimizer_steps(kind):
    model = _model(kind)
    before = _weights(model)
    versions = [layer.base_layer.weight._version for _, layer in model.paca_layers()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        y = model(torch.randn(4, 24))
        _assert_bit_exact(model, before)
        y.square().sum().backward()
        _assert_bit_exact(model, before)
        opt.step()
        opt.zero_grad()
        _assert_bit_exact(model, before)
    # the swap writes through .data: autograd's version counter of W is not bumped
    assert versions == [layer.base_layer.weight._version for _, layer in model.paca_layers()]


def test_base_weight_is_restored_when_the_gemm_raises(monkeypatch):
    backend = CPUBackend()
    model = _model(backend=backend)
    before = _weights(model)

    def boom(*_a, **_k):
        raise RuntimeError("injected GEMM failure")

    monkeypatch.setattr(backend, "linear", boom)
    with pytest.raises(BackendContractError, match=r"'cpu' failed in linear_forward.*injected"):
        model(torch.randn(3, 24))
    _assert_bit_exact(model, before)
    monkeypatch.undo()
    monkeypatch.setattr(backend, "input_grad", boom)
    y = model(torch.randn(3, 24, requires_grad=True))
    with pytest.raises(BackendContractError, match="linear_backward"):
        y.sum().backward()
    _assert_bit_exact(model, before)


def test_other_ops_that_saved_the_weight_stay_valid():
    """A weight used by a plain op *and* a PaCA layer (tied): the swap must not make the
    plain op's saved weight look modified in place."""
    model = _model()
    layer = model.model[0]
    w = layer.base_layer.weight
    x = torch.randn(3, 24, requires_grad=True)
    plain = nn.functional.linear(x, w.detach().requires_grad_(False) * 1.0)  # saves a copy
    tied = x @ w.t()  # saves w itself for x's gradient
    out = model(x).sum() + tied.sum() + plain.sum()
    out.backward()  # raises "modified by an inplace operation" if the version was bumped
    assert x.grad is not None


# ------------------------------------------------------------------ no stale columns
def _check_fresh(model: paca.PacaModel, x: torch.Tensor) -> None:
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _dense_reference(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opt_kind", ["foreach", "fused", "for-loop"])
def test_no_stale_columns_after_optimizer_steps(opt_kind):
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=0.05,
        foreach=opt_kind == "foreach",
        fused=True if opt_kind == "fused" else None,
    )
    x = torch.randn(6, 24)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        _check_fresh(model, x)


def test_no_stale_columns_with_gradient_accumulation_eval_and_disable():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(6, 24)
    for _ in range(2):
        for _ in range(3):  # accumulate over micro-batches, then step
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        _check_fresh(model, x)
        model.train()
    with model.disable_adapter(), torch.no_grad():
        plain = model(x)
    torch.testing.assert_close(plain, copy.deepcopy(model).unload()(x).detach())
    _check_fresh(model, x)  # and back on after the context


def test_no_stale_columns_after_load_state_dict_and_direct_edits():
    model = _model()
    x = torch.randn(6, 24)
    other = _model()
    for _, layer in other.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.3)
            layer.base_layer.weight.mul_(1.5)
    model.load_state_dict(other.state_dict())
    _check_fresh(model, x)
    torch.testing.assert_close(model(x), other(x))
    for _, layer in model.paca_layers():
        layer.paca_delta["default"].data.add_(0.1)  # an edit no optimizer sees
    _check_fresh(model, x)


def test_checkpoint_recompute_uses_the_same_columns_and_gradients():
    from torch.utils.checkpoint import checkpoint

    model = _model()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 24, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    for (_, a), (_, b) in zip(model.paca_layers(), ref.paca_layers(), strict=True):
        torch.testing.assert_close(a.paca_delta["default"].grad, b.paca_delta["default"].grad)


# ------------------------------------------------------------------ both strategies agree
@pytest.mark.parametrize("strategy", ["swap", "decompose"])
def test_each_column_strategy_matches_the_dense_reference(strategy):
    class Strategy(CPUBackend):
        name = f"cpu-{strategy}"
        priority = None
        column_strategy = strategy

    model = _model(backend=Strategy())
    ref = _model()
    before = _weights(model)
    x = torch.randn(2, 7, 24, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = model(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (_, a), (_, b) in zip(model.paca_layers(), ref.paca_layers(), strict=True):
        torch.testing.assert_close(a.paca_delta["default"].grad, b.paca_delta["default"].grad)
    _assert_bit_exact(model, before)


# ------------------------------------------------------------------ capabilities, contract
class Fp32Only(CPUBackend):
    name = "fp32-only"
    priority = None
    capabilities = frozenset({"float32"})


def test_an_undeclared_dtype_is_refused_naming_backend_and_capability():
    model = _model(backend=Fp32Only())
    with (
        pytest.raises(BackendCapabilityError, match=r"'fp32-only'.*'bfloat16' capability"),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model(torch.randn(3, 24))
    bf16 = _model(backend=Fp32Only(), dtype=torch.bfloat16)
    with pytest.raises(BackendCapabilityError, match="bfloat16"):
        bf16(torch.randn(3, 24, dtype=torch.bfloat16))
    model(torch.randn(3, 24))  # fp32 still fine


def test_autocast_hands_the_backend_only_the_compute_dtype():
    seen: list[torch.dtype] = []

    class Recording(CPUBackend):
        name = "recording"
        priority = None

        def linear(self, x, weight, bias):
            seen.extend({x.dtype, weight.dtype, *([bias.dtype] if bias is not None else [])})
            return super().linear(x, weight, bias)

        def delta_grad(self, grad_out, x_sel, out_dtype):
            seen.extend({grad_out.dtype, x_sel.dtype})
            return super().delta_grad(grad_out, x_sel, out_dtype)

    model = _model(backend=Recording())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(3, 24))
    y.float().sum().backward()
    assert set(seen) == {torch.bfloat16}
    for _, layer in model.paca_layers():  # fp32 master deltas get fp32 gradients
        assert layer.paca_delta["default"].grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("member", "broken", "message"),
    [
        ("linear", lambda self, x, w, b: torch.zeros(3), r"linear_forward"),
        ("gather", lambda self, x, idx, dim=-1: x[..., :1].clone(), r"linear_forward"),
        (
            "linear_forward",
            lambda self, x, w, b, d, i: (torch.zeros(3), x[..., i]),
            r"linear_forward returned y of shape \(3,\)",
        ),
        (
            "linear_forward",
            lambda self, x, w, b, d, i: (x @ w.t(), x[..., :1].clone()),
            r"linear_forward returned x_sel of shape",
        ),
        (
            "delta_grad",
            lambda self, g, xs, out_dtype: torch.zeros(1, dtype=out_dtype),
            r"linear_backward returned grad_delta of shape",
        ),
        (
            "input_grad",
            lambda self, g, w: (g @ w).half(),
            r"linear_backward",
        ),
    ],
)
def test_a_backend_breaking_the_contract_is_named_with_its_member(member, broken, message):
    Broken = type("Broken", (CPUBackend,), {"name": "broken", "priority": None, member: broken})
    model = _model(backend=Broken())
    with pytest.raises(BackendContractError, match=r"'broken'.*" + message):
        model(torch.randn(3, 24, requires_grad=True)).sum().backward()


def test_a_saved_activation_that_is_a_view_of_the_input_is_refused():
    class ViewGather(CPUBackend):
        name = "view-gather"
        priority = None

        def gather(self, x, idx, dim=-1):
            return x.narrow(dim, 0, idx.numel())  # wrong values *and* a view of all of x

    model = _model(backend=ViewGather())
    with pytest.raises(BackendContractError, match="sharing storage with the input"):
        model(torch.randn(3, 24))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_deltas_get_fp32_accumulated_gradients_rounded_once(dtype):
    """With deltas in the model's half dtype the gradient is the fp32 sum rounded once:
    over 70k rows a half-precision accumulation would be off by far more than one ulp."""
    torch.manual_seed(0)
    model = paca.wrap(
        nn.Sequential(nn.Linear(16, 8, bias=False).to(dtype)),
        paca.PacaConfig(r=4, target_modules=["0"], delta_dtype=None),
        backend=CPUBackend(),
    )
    layer = model.model[0]
    x = torch.randn(70_000, 16, dtype=dtype)
    g = torch.randn(70_000, 8, dtype=dtype)
    model(x).backward(g)
    grad = layer.paca_delta["default"].grad
    assert grad.dtype == dtype
    ref = g.double().t() @ x.double()[:, layer.paca_idx["default"]]
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1)
    assert ((grad.double() - ref).abs() <= ulp).all()


def test_compile_and_graph_capture_are_refused_without_the_capability():
    from paca.graph_mode import compile as paca_compile
    from paca.graph_mode import prepare_for_inference

    class Plain(CPUBackend):
        name = "plain"
        priority = None
        capabilities = frozenset({"float32"})

    model = _model(backend=Plain())
    with pytest.raises(BackendCapabilityError, match=r"'compile' capability.*'plain'"):
        paca_compile(model)
    with pytest.raises(BackendCapabilityError, match=r"'graphs' capability.*'plain'"):
        prepare_for_inference(model)
    assert prepare_for_inference(model, graphs=False) is model and not model.training
    assert paca_compile(_model()) is not None  # the CPU backend declares "compile"
