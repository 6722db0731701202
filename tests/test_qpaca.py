"""QPaCA: PaCA on bitsandbytes 4-bit NF4 bases (issue 14).

Gradients equal the dense gradients of the dequantized model; only ``x[..., idx]`` is
saved; the packed base is bit-exact after training, disable and unload; selection,
save/load, merge_and_unload work on a 4-bit base; bad inputs get errors that name the
module or the backend and say what to do.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paca
from paca.backend_abc import BackendCapabilityError
from paca.layer import PacaLinear
from paca.model import MergeError

bnb = pytest.importorskip("bitsandbytes")

from paca.layers_quant import PacaLinear4bit, quantize_nf4  # noqa: E402
from paca.ops_quant import nf4_dequantize, nf4_kernel_problem, paca_linear_4bit  # noqa: E402

IN, HID, OUT, R = 64, 128, 32, 8


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(IN, HID)
        self.b = nn.Linear(HID, OUT, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x)))


def _qnet(double_quant: bool = True, dtype: torch.dtype = torch.float32) -> Net:
    return quantize_nf4(Net().to(dtype), double_quant=double_quant)


def _wrap(model: nn.Module, **kw) -> paca.PacaModel:
    pm = paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a", "b"], **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in pm.paca_layers():
            d = layer.paca_delta["default"]
            d.copy_(torch.randn(d.shape, generator=g) * 0.05)
    return pm


def _snapshot(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every packed byte and every quant_state tensor of the 4-bit layers, copied."""
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        name = name.replace(".base_layer", "")
        w = m.weight
        qs = w.quant_state
        out.append((f"{name}.packed", w.data.clone()))
        out.append((f"{name}.absmax", qs.absmax.clone()))
        out.append((f"{name}.code", qs.code.clone()))
        if qs.nested:
            out.append((f"{name}.absmax2", qs.state2.absmax.clone()))
            out.append((f"{name}.code2", qs.state2.code.clone()))
            out.append((f"{name}.offset", torch.as_tensor(qs.offset).clone()))
        out.append((f"{name}.meta", torch.tensor([*qs.shape, qs.blocksize])))
        if getattr(m, "bias", None) is not None:
            out.append((f"{name}.bias", m.bias.detach().clone()))
    return out


def _same(a, b) -> None:
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def _dense_reference(pm: paca.PacaModel) -> dict[str, torch.Tensor]:
    """``dequant(W) + scatter(delta)`` of every adapted layer, as leaves requiring grad."""
    out = {}
    for name, layer in pm.paca_layers():
        w = nf4_dequantize(layer.base_layer.weight, layer.quant_state).float().clone()
        w[:, layer.paca_idx["default"]] += layer.paca_delta["default"].detach().float()
        out[name] = w.requires_grad_(True)
    return out


# --- the math --------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain"])
def test_gradients_equal_the_dense_gradients_of_the_dequantized_model(double_quant):
    pm = _wrap(_qnet(double_quant))
    assert {type(m) for _, m in pm.paca_layers()} == {PacaLinear4bit}
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = pm(x)
    y.square().sum().backward()

    w = _dense_reference(pm)
    xr = x.detach().clone().requires_grad_(True)
    bias = pm.model.a.base_layer.bias.detach()
    yr = torch.nn.functional.gelu(xr @ w["a"].t() + bias) @ w["b"].t()
    yr.square().sum().backward()

    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for name, layer in pm.paca_layers():
        delta = layer.paca_delta["default"]
        assert delta.grad.dtype == torch.float32
        torch.testing.assert_close(
            delta.grad, w[name].grad[:, layer.paca_idx["default"]], rtol=1e-5, atol=1e-5
        )


def test_bf16_compute_and_fp32_delta_accumulate_in_fp32():
    pm = _wrap(_qnet(dtype=torch.bfloat16), delta_dtype="float32")
    layer = pm.model.a
    assert (
        layer.dense_dtype == torch.bfloat16 and layer.paca_delta["default"].dtype == torch.float32
    )
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(3)).bfloat16()
    g = torch.randn(3, HID, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    idx = layer.paca_idx["default"]
    expected = g.float().t() @ x.float()[:, idx]  # dYᵀ·x_sel in fp32, no bf16 rounding
    torch.testing.assert_close(layer.paca_delta["default"].grad, expected, rtol=1e-6, atol=1e-6)


def test_saved_activations_are_r_of_in_of_the_input_and_nothing_weight_sized():
    pm = _wrap(_qnet())
    layer = pm.model.a
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in pm.buffers()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, 16, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert [tuple(t.shape) for t in activations] == [(4, 16, R)]  # x[..., idx] only
    nbytes = sum(t.untyped_storage().nbytes() for t in activations)
    assert nbytes == x.numel() * x.element_size() * R // IN
    weight_elems = HID * IN
    assert all(t.numel() < weight_elems for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()  # and the backward works from what was saved
    assert layer.paca_delta["default"].grad is not None


def test_op_is_exact_for_zero_delta_against_bitsandbytes_linear4bit():
    q = _qnet().a
    x = torch.randn(3, IN)
    idx = torch.arange(R)
    delta = torch.zeros(HID, R)
    y = paca_linear_4bit(
        x, q.weight, q.weight.quant_state, q.bias, delta, idx, paca.get_backend(), None
    )
    with torch.no_grad():
        assert torch.equal(y, q(x))


# --- the base stays bit-exact ----------------------------------------------------------
def test_base_is_bit_exact_after_training_disable_and_unload():
    model = _qnet()
    before = _snapshot(model)
    pm = _wrap(model)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, IN)
    for _ in range(3):
        opt.zero_grad()
        pm(x).square().mean().backward()
        opt.step()
    _same(before, _snapshot(pm.model))
    with pm.disable_adapter():
        plain = pm(x)
    _same(before, _snapshot(pm.model))
    base = pm.unload()
    _same(before, _snapshot(base))
    assert type(base.a) is bnb.nn.Linear4bit and not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        assert torch.equal(base(x), plain)


# --- everything else on a 4-bit base -----------------------------------------------------
def test_weight_norm_selection_reads_the_dequantized_weight():
    model = _qnet()
    dense = {n: nf4_dequantize(getattr(model, n).weight, getattr(model, n).weight.quant_state)
             for n in ("a", "b")}  # fmt: skip
    pm = paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a", "b"], selection="weight_norm"))
    for name, layer in pm.paca_layers():
        want = torch.sort(dense[name].float().norm(dim=0), descending=True, stable=True).indices
        assert layer.paca_idx["default"].tolist() == sorted(want[:R].tolist()), name


def test_gradient_selection_uses_the_dense_gradient_of_the_dequantized_layer():
    model = _qnet()
    batches = [torch.randn(4, IN, generator=torch.Generator().manual_seed(s)) for s in range(2)]

    def loss_fn(out, batch):
        return out.square().mean()

    # reference: the same network with dense dequantized weights, gradient selection
    ref = Net()
    with torch.no_grad():
        for n in ("a", "b"):
            q = getattr(model, n)
            getattr(ref, n).weight.copy_(nf4_dequantize(q.weight, q.weight.quant_state))
        ref.a.bias.copy_(model.a.bias)
    cfg = paca.PacaConfig(r=R, target_modules=["a", "b"], selection="gradient")
    dense = paca.wrap(ref, cfg, calibration=batches, loss_fn=loss_fn)
    before = _snapshot(model)
    quant = paca.wrap(model, cfg, calibration=batches, loss_fn=loss_fn)
    _same(before, _snapshot(quant.model))
    for (name, a), (_, b) in zip(dense.paca_layers(), quant.paca_layers(), strict=True):
        assert a.paca_idx["default"].tolist() == b.paca_idx["default"].tolist(), name


def test_save_load_adapter_holds_no_base_and_reproduces_outputs(tmp_path):
    from paca.io import read_adapter

    pm = _wrap(_qnet())
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(tmp_path)
    _, tensors = read_adapter(tmp_path)
    assert all(k.endswith((".delta", ".idx")) for k in tensors)
    assert sum(t.numel() for k, t in tensors.items() if k.endswith(".delta")) == (HID + OUT) * R
    loaded = paca.load(_qnet(), tmp_path)
    assert isinstance(loaded.model.a, PacaLinear4bit)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def _dequantized_net(quantized: Net) -> Net:
    """The same network with dense weights ``dequant(W)``."""
    dense = Net()
    with torch.no_grad():
        for n in ("a", "b"):
            q = getattr(quantized, n)
            getattr(dense, n).weight.copy_(nf4_dequantize(q.weight, q.weight.quant_state))
        dense.a.bias.copy_(quantized.a.bias)
    return dense


def test_a_4bit_adapter_loads_onto_the_dense_model_and_back(tmp_path):
    quantized = _qnet()
    dense = _dequantized_net(quantized)
    pm = _wrap(quantized)
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(tmp_path / "q")
    on_dense = paca.load(dense, tmp_path / "q")
    assert type(on_dense.model.a) is PacaLinear
    with torch.no_grad():
        torch.testing.assert_close(on_dense(x), want, rtol=1e-5, atol=1e-5)
    on_dense.save_pretrained(tmp_path / "d")
    back = paca.load(_qnet(), tmp_path / "d")
    assert type(back.model.a) is PacaLinear4bit
    with torch.no_grad():
        assert torch.equal(back(x), want)
    from paca.io import AdapterMismatchError

    other = Net()
    other.a = nn.Linear(IN, HID + 1)
    with pytest.raises(AdapterMismatchError, match=r"module 'a' has weight shape \[129, 64\]"):
        paca.load(other, tmp_path / "q")


def test_merge_into_4bit_is_refused_and_merge_and_unload_returns_a_dense_model():
    model = _qnet()
    before = _snapshot(model)
    pm = _wrap(model)
    x = torch.randn(3, IN)
    with torch.no_grad():
        want = pm(x)
    with pytest.raises(MergeError, match=r"module 'a'.*4-bit NF4.*merge_and_unload"):
        pm.merge()
    _same(before, _snapshot(pm.model))
    dense = pm.merge_and_unload()
    assert type(dense.a) is nn.Linear and dense.a.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in dense.parameters())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refusal_leaves_the_4bit_model_wrapped():
    pm = _wrap(_qnet())
    with torch.no_grad():
        pm.model.a.paca_delta["default"][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        pm.merge_and_unload(safe_merge=True)
    assert isinstance(pm.model.a, PacaLinear4bit) and isinstance(pm.model.b, PacaLinear4bit)


def test_quantize_nf4_is_one_call_on_a_dense_model_and_mixed_models_work():
    model = quantize_nf4(Net(), target_modules=["a"], double_quant=False)
    assert type(model.a) is bnb.nn.Linear4bit and type(model.b) is nn.Linear
    assert model.a.weight.quant_type == "nf4" and not model.a.weight.quant_state.nested
    pm = paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a", "b"]))
    assert type(pm.model.a) is PacaLinear4bit and type(pm.model.b) is PacaLinear
    with pytest.raises(ValueError, match="matches no dense nn.Linear"):
        quantize_nf4(Net(), target_modules=["nope"])


def test_quantize_nf4_on_meta_gives_meta_4bit_layers():
    with torch.device("meta"):
        model = Net()
    quantize_nf4(model)
    w = model.a.weight
    assert w.is_meta and w.dtype == torch.uint8 and w.numel() == IN * HID // 2
    pm = paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a", "b"]))
    y = pm(torch.randn(2, IN, device="meta", requires_grad=True))
    y.sum().backward()
    assert y.shape == (2, OUT) and pm.model.a.paca_delta["default"].grad.shape == (HID, R)


# --- bad input ---------------------------------------------------------------------------
def test_backend_without_nf4_is_refused_at_wrap_naming_backend_and_capability():
    from backends.paca_cpu.backend import CPUBackend

    class NoNF4(CPUBackend):
        name = "no-nf4-test"
        capabilities = CPUBackend.capabilities - {"nf4"}

    model = _qnet()
    with pytest.raises(BackendCapabilityError, match=r"'no-nf4-test'.*'nf4'.*Linear4bit"):
        paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a"]), backend=NoNF4())
    assert type(model.a) is bnb.nn.Linear4bit  # left as it was
    pm = _wrap(_qnet())
    with pytest.raises(BackendCapabilityError, match="no-nf4-test"):
        pm.to_backend(NoNF4())


def test_missing_bitsandbytes_kernels_name_the_version_and_the_fix(monkeypatch):
    import bitsandbytes.functional as bnbf

    def broken(*a, **k):
        raise RuntimeError("no kernel registered for device cpu")

    quantized = _qnet()  # built while the kernels work
    nf4_kernel_problem.cache_clear()
    monkeypatch.setattr(bnbf, "quantize_4bit", broken)
    try:
        problem = nf4_kernel_problem("cpu")
        assert bnb.__version__ in problem and "pip install -U" in problem
        with pytest.raises(BackendCapabilityError, match=rf"'cpu'.*{bnb.__version__}.*upgrade"):
            paca.wrap(quantized, paca.PacaConfig(r=R, target_modules=["a"]))
        paca.wrap(Net(), paca.PacaConfig(r=R, target_modules=["a"]))  # dense: no probe
    finally:
        nf4_kernel_problem.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(bnb, "__version__", "0.42.0")
    try:
        with pytest.raises(BackendCapabilityError, match=r"bitsandbytes 0\.42\.0.*>= 0\.45"):
            _wrap(_qnet())
    finally:
        nf4_kernel_problem.cache_clear()
    monkeypatch.undo()
    assert nf4_kernel_problem("cpu") is None


def test_8bit_fp4_and_unquantized_layers_are_refused_with_advice():
    cases = [
        (bnb.nn.Linear8bitLt(IN, HID, has_fp16_weights=False), r"not 8-bit Linear8bitLt.*load_in_4bit"),
        (bnb.nn.Linear4bit(IN, HID, quant_type="fp4").to("cpu"), r"NF4 only.*FP4.*quant_type='nf4'"),
    ]  # fmt: skip
    for module, advice in cases:
        model = Net()
        model.a = module
        with pytest.raises(TypeError, match=rf"'a'.*{advice}"):
            paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a"]))
    model = Net()
    model.a = bnb.nn.Linear4bit(IN, HID, quant_type="nf4")  # not quantized until moved
    with pytest.raises(TypeError, match=r"'a'.*not quantized yet.*model.to\('cpu'\)"):
        paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a"]), move_to_device=False)
    pm = paca.wrap(model, paca.PacaConfig(r=R, target_modules=["a"]))  # moving quantizes it
    assert isinstance(pm.model.a, PacaLinear4bit)
