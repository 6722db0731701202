"""PaCA on nn.Linear: gradients equal the dense ones, only x[..., idx] is saved."""

from __future__ import annotations

import pytest
import torch
from helpers import params_and_buffers, saved_activation_bytes
from torch import nn

import paca


def _wrapped_linear(in_f: int, out_f: int, r: int, bias: bool, dtype=torch.float32):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    model = paca.wrap(nn.Sequential(lin), paca.PacaConfig(r=r, target_modules=["0"]))
    layer = model.model[0]
    with torch.no_grad():  # a non-zero delta makes W_eff differ from W
        layer.paca_delta["default"].normal_(0, 0.1)
    return model, layer


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_delta_grad_equals_dense_columns(shape, bias):
    model, layer = _wrapped_linear(24, 16, r=6, bias=bias)
    idx, delta = layer.paca_idx["default"], layer.paca_delta["default"]
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 16)
    model(x).backward(g)

    w_dense = layer.base_layer.weight.detach().clone()
    w_dense[:, idx] += delta.detach()
    w_dense.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    b = layer.base_layer.bias
    y_dense = nn.functional.linear(x2, w_dense, b.detach() if b is not None else None)
    y_dense.backward(g)

    torch.testing.assert_close(model(x), y_dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.grad, w_dense.grad[:, idx], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    # frozen columns and the base weight get nothing
    assert layer.base_layer.weight.grad is None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.0.paca_delta.default"
    ]


@pytest.mark.parametrize("shape", [(64, 96), (4, 16, 96)], ids=["2d", "3d"])
def test_saved_activations_are_r_over_in_of_input(shape):
    r, in_f = 12, 96
    model, _ = _wrapped_linear(in_f, 32, r=r, bias=True)
    x = torch.randn(*shape, requires_grad=True)
    _, saved_bytes, saved = saved_activation_bytes(lambda: model(x), params_and_buffers(model))
    input_bytes = x.numel() * x.element_size()
    assert saved_bytes == input_bytes * r // in_f, [tuple(t.shape) for t in saved]


def test_saved_activations_of_dense_linear_for_contrast():
    lin = nn.Linear(96, 32)
    x = torch.randn(64, 96, requires_grad=True)
    _, saved_bytes, _ = saved_activation_bytes(lambda: lin(x), params_and_buffers(lin))
    assert saved_bytes == x.numel() * x.element_size()  # the whole input


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_grads_accumulate_in_fp32(dtype):
    model, layer = _wrapped_linear(64, 32, r=8, bias=True, dtype=dtype)
    assert layer.paca_delta["default"].dtype == torch.float32  # fp32 master delta by default
    x = torch.randn(256, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(256, 32, dtype=dtype)
    model(x).backward(g)
    idx = layer.paca_idx["default"]
    ref = g.float().t() @ x.detach().float()[:, idx]
    torch.testing.assert_close(layer.paca_delta["default"].grad, ref, rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == dtype


def test_autocast_bf16_saves_cast_input_and_keeps_fp32_delta():
    model, layer = _wrapped_linear(64, 32, r=8, bias=True)
    x = torch.randn(10, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, saved_bytes, _ = saved_activation_bytes(lambda: model(x), params_and_buffers(model))
    assert y.dtype == torch.bfloat16
    assert saved_bytes == 10 * 8 * 2  # r bf16 channels per token
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer.paca_delta["default"].grad.dtype == torch.float32


def test_base_weight_requiring_grad_is_refused():
    model, layer = _wrapped_linear(8, 4, r=2, bias=False)
    layer.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="base weight requires grad"):
        model(torch.randn(3, 8))
