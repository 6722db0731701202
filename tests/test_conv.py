"""PaCA on transformers Conv1D and nn.Conv2d: dense-equivalent gradients, r/in saved."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import params_and_buffers, saved_activation_bytes, vit_projections
from torch import nn
from transformers.pytorch_utils import Conv1D

import paca
from paca.layers_conv import PacaConv1D, PacaConv2d


def _randomize(model: paca.PacaModel, std: float = 0.1) -> None:
    for _, layer in model.paca_layers():
        with torch.no_grad():
            for d in layer.paca_delta.values():
                d.normal_(0, std)


# ----------------------------------------------------------------------- Conv1D
def _wrapped_conv1d(in_f: int = 24, out_f: int = 16, r: int = 6):
    torch.manual_seed(0)
    conv = Conv1D(out_f, in_f)
    with torch.no_grad():
        conv.bias.normal_()
    model = paca.wrap(nn.Sequential(conv), paca.PacaConfig(r=r, target_modules=["0"]))
    _randomize(model)
    return model, model.model[0]


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)], ids=["2d", "3d"])
def test_conv1d_grads_equal_dense_rows(shape):
    model, layer = _wrapped_conv1d()
    assert isinstance(layer, PacaConv1D)
    idx, delta = layer.paca_idx["default"], layer.paca_delta["default"]
    assert delta.shape == (16, 6)  # (out, r) although the weight is stored (in, out)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 16)
    y = model(x)
    y.backward(g)

    w_dense = layer.base_layer.weight.detach().clone()  # (in, out)
    w_dense[idx, :] += delta.detach().t()
    w_dense.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.addmm(layer.base_layer.bias, x2.reshape(-1, 24), w_dense).reshape(y.shape)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta.grad, w_dense.grad[idx, :].t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert layer.base_layer.weight.grad is None


def test_conv1d_saves_r_over_in_and_never_copies_the_weight():
    model, layer = _wrapped_conv1d(in_f=96, out_f=32, r=12)
    assert layer.weight_oi().data_ptr() == layer.base_layer.weight.data_ptr()  # a view
    x = torch.randn(4, 16, 96, requires_grad=True)
    _, saved_bytes, saved = saved_activation_bytes(lambda: model(x), params_and_buffers(model))
    assert saved_bytes == x.numel() * x.element_size() * 12 // 96, [t.shape for t in saved]


@pytest.mark.slow
def test_tiny_gpt2_all_linear_adapts_conv1d_and_unload_is_bit_exact():
    from paca.tiny import tiny_gpt2

    base = tiny_gpt2()
    original = copy.deepcopy(base.state_dict())
    model = paca.wrap(base, paca.PacaConfig(r=4))
    kinds = {type(layer) for _, layer in model.paca_layers()}
    assert kinds == {PacaConv1D}
    names = {n.split(".")[-1] for n, _ in model.paca_layers()}
    assert names == {"c_attn", "c_proj", "c_fc"}
    _randomize(model, 0.05)
    ids = torch.randint(0, 100, (2, 12))
    y = model(input_ids=ids).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=ids).logits, y, rtol=1e-4, atol=1e-4)
    model.unmerge()
    unloaded = model.unload()
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, original[k]), k


# ----------------------------------------------------------------------- Conv2d
CONV_CASES = {
    "3x3-pad1": dict(kernel_size=3, padding=1),
    "stride2-nobias": dict(kernel_size=3, stride=2, padding=1, bias=False),
    "dilated-rect": dict(kernel_size=(3, 2), padding=(2, 1), dilation=2),
    "same-even": dict(kernel_size=4, padding="same"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "patch": dict(kernel_size=4, stride=4),
}


def _wrapped_conv2d(cin: int = 8, cout: int = 6, r: int = 3, **kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, **kw)
    model = paca.wrap(nn.Sequential(conv), paca.PacaConfig(r=r, target_modules=["0"]))
    _randomize(model)
    return model, model.model[0]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # from the dense reference conv
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv2d_grads_equal_dense_slice(case):
    model, layer = _wrapped_conv2d(**CONV_CASES[case])
    assert isinstance(layer, PacaConv2d)
    idx, delta = layer.paca_idx["default"], layer.paca_delta["default"]
    base = layer.base_layer
    assert delta.shape == (6, 3, *base.kernel_size)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    y.backward(g)

    dense = copy.deepcopy(base)
    with torch.no_grad():
        dense.weight[:, idx] += delta.detach()
    dense.weight.requires_grad_(True)
    if dense.bias is not None:
        dense.bias.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = dense(x2)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.grad, dense.weight.grad[:, idx], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    if base.bias is not None:
        assert not base.bias.requires_grad  # frozen like every base parameter
    assert base.weight.grad is None


def test_conv2d_saves_only_the_selected_channels():
    model, _ = _wrapped_conv2d(cin=16, cout=8, r=4, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    _, saved_bytes, saved = saved_activation_bytes(lambda: model(x), params_and_buffers(model))
    assert saved_bytes == x.numel() * x.element_size() * 4 // 16, [t.shape for t in saved]
    dense = nn.Conv2d(16, 8, 3, padding=1)
    _, dense_bytes, _ = saved_activation_bytes(lambda: dense(x), params_and_buffers(dense))
    assert saved_bytes * 4 == dense_bytes  # the dense conv keeps the whole input


def test_conv2d_unbatched_input_and_bias_grad():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    model = paca.wrap(nn.Sequential(conv), paca.PacaConfig(r=2, target_modules=["0"]))
    x = torch.randn(4, 7, 7)
    torch.testing.assert_close(model(x), conv(x))  # zero delta: the base conv
    assert model(x).shape == (5, 7, 7)


def test_conv2d_autocast_bf16_computes_in_bf16_with_fp32_delta_grad():
    model, layer = _wrapped_conv2d(kernel_size=3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    delta = layer.paca_delta["default"]
    assert delta.grad is not None and delta.grad.dtype == torch.float32
    idx = layer.paca_idx["default"]
    xb = x.bfloat16().float()[:, idx]
    ref = torch.nn.grad.conv2d_weight(xb, delta.shape, torch.ones_like(y).float(), 1, 1)
    torch.testing.assert_close(delta.grad, ref, rtol=1e-2, atol=1e-2)


def test_conv2d_merge_unmerge_unload_exact():
    model, layer = _wrapped_conv2d(kernel_size=3, padding=1)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 8, 9, 9)
    y = model(x)
    model.merge()
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)
    model.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(x), y, rtol=1e-6, atol=1e-6)
    plain = model.unload()
    assert isinstance(plain[0], nn.Conv2d) and torch.equal(plain[0].weight, original)


def test_grouped_conv_is_refused_naming_the_module():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4))
    with pytest.raises(TypeError, match=r"'0'.*Conv2d.*groups=4"):
        paca.wrap(net, paca.PacaConfig(r=2, target_modules=["0"]))


def test_unsupported_type_names_module_and_type():
    net = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(TypeError, match=r"'0'.*torch\.nn\.modules\.conv\.Conv1d.*PaCA supports"):
        paca.wrap(net, paca.PacaConfig(r=2, target_modules=["0"]))


@pytest.mark.slow
def test_all_linear_skips_conv2d_but_explicit_targets_reach_it():
    from paca.tiny import tiny_vit

    vit = tiny_vit()
    model = paca.wrap(vit, paca.PacaConfig(r=2))
    assert not any(isinstance(layer, PacaConv2d) for _, layer in model.paca_layers())
    targets = ["projection", *vit_projections(tiny_vit(), "q", "v")]
    model = paca.wrap(tiny_vit(), paca.PacaConfig(r=2, target_modules=targets))
    conv = [n for n, layer in model.paca_layers() if isinstance(layer, PacaConv2d)]
    assert conv == ["vit.embeddings.patch_embeddings.projection"]
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixel_values=pixels, labels=torch.tensor([1, 2]))
    out.loss.backward()
    layer = model.model.get_submodule(conv[0])
    assert layer.paca_delta["default"].grad.abs().sum() > 0


def test_conv_input_is_padded_like_the_base_layer():
    # reflect padding is applied before the op, so the saved channels are of the padded input
    model, layer = _wrapped_conv2d(kernel_size=3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        layer.paca_delta["default"].zero_()
    x = torch.randn(1, 8, 6, 6)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), layer.base_layer.weight,
                   layer.base_layer.bias)  # fmt: skip
    torch.testing.assert_close(model(x), ref)


@pytest.mark.slow
def test_conv2d_compiles_without_graph_breaks_and_matches_eager():
    model, layer = _wrapped_conv2d(kernel_size=3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    y = model(x)
    y.square().sum().backward()
    eager_grad = layer.paca_delta["default"].grad.clone()
    layer.paca_delta["default"].grad = None
    compiled = torch.compile(model, backend="aot_eager")
    yc = compiled(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(layer.paca_delta["default"].grad, eager_grad)
