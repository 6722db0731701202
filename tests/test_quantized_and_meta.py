"""Quantized layers no registered layer type accepts are refused at wrap; column indices
survive meta-device construction and ``to_empty()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paca
import paca.layer as paca_layer
from paca.layer import PacaLayer, PacaLinear, is_quantized_module, layer_class_for


class Net(nn.Module):
    def __init__(self, q: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.q = q if q is not None else nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.q(self.a(x)))


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _quantized_layers():
    """(label, module) for each kind of quantized linear this test knows how to build."""

    class FakeQuantTensor(torch.Tensor):  # like torchao's subclasses: reports a float dtype
        pass

    int8 = nn.Linear(16, 16)
    int8.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)
    sub = nn.Linear(16, 16)
    sub.weight = nn.Parameter(
        torch.Tensor._make_subclass(FakeQuantTensor, torch.zeros(16, 16)), requires_grad=False
    )
    assert sub.weight.dtype == torch.float32 and type(sub.weight) is FakeQuantTensor
    out = [("int8 weight", int8), ("tensor subclass", sub)]
    try:
        import bitsandbytes as bnb
    except ImportError:
        return out
    out.append(("bnb Linear8bitLt", bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)))
    # QPaCA adapts quantized NF4 Linear4bit; FP4 (here not even quantized yet) is refused
    out.append(("bnb Linear4bit fp4", bnb.nn.Linear4bit(16, 16, quant_type="fp4")))
    return out


QUANTIZED = _quantized_layers()


@pytest.mark.parametrize(("label", "module"), QUANTIZED, ids=[q[0] for q in QUANTIZED])
def test_quantized_layers_are_refused_by_name_for_every_target_form(label, module):
    assert is_quantized_module(module) and layer_class_for(module) is None
    for targets in (["q"], "all-linear", r"a|q"):
        model = Net(module)
        with pytest.raises(TypeError) as err:
            paca.wrap(model, paca.PacaConfig(r=2, target_modules=targets))
        msg = str(err.value)
        assert "'q'" in msg, (targets, msg)
        assert "no registered PaCA layer type accepts this quantized module" in msg
        assert type(module).__qualname__ in msg or "quantized" in msg
        assert not any(isinstance(m, PacaLayer) for m in model.modules())
    # excluding it adapts the rest
    pm = paca.wrap(Net(module), paca.PacaConfig(r=2, exclude_modules=["q"]))
    assert [n for n, _ in pm.paca_layers()] == ["a", "head"]


def test_bnb_linear8bitlt_message_names_its_class():
    bnb = _bnb()
    model = Net(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    with pytest.raises(TypeError, match=r"'q'.*Linear8bitLt.*Int8Params"):
        paca.wrap(model, paca.PacaConfig(r=2, target_modules=["q"]))


def test_registering_a_layer_type_lifts_the_refusal(monkeypatch):
    bnb = _bnb()
    monkeypatch.setattr(paca_layer, "_LAYER_TYPES", list(paca_layer._LAYER_TYPES))

    @paca_layer.register_layer_type(lambda m: isinstance(m, bnb.nn.Linear8bitLt))
    class PacaInt8(PacaLinear):
        pass

    model = Net(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    pm = paca.wrap(model, paca.PacaConfig(r=2))
    assert {n: type(m) for n, m in pm.paca_layers()}["q"] is PacaInt8


def test_dense_float_linear_subclasses_are_still_accepted():
    class MyLinear(nn.Linear):
        pass

    pm = paca.wrap(Net(MyLinear(16, 16)), paca.PacaConfig(r=2, target_modules=["q"]))
    assert isinstance(pm.model.q, PacaLinear)


def test_lazy_linear_is_refused_with_advice():
    model = Net(nn.LazyLinear(16))
    with pytest.raises(ValueError, match=r"\['q.weight', 'q.bias'\].*forward pass"):
        paca.wrap(model, paca.PacaConfig(r=2, target_modules=["q"]))


# --- meta device and to_empty --------------------------------------------------------
def _reference(cfg: paca.PacaConfig) -> tuple[dict[str, torch.Tensor], paca.PacaModel]:
    torch.manual_seed(0)
    base = Net()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    return weights, paca.wrap(base, cfg)


def _load_base(pm: paca.PacaModel, weights: dict[str, torch.Tensor]) -> None:
    """Load a plain checkpoint into a wrapped model (PaCA layers keep it in base_layer)."""
    mapped = {}
    for key in pm.model.state_dict():
        plain = key.replace(".base_layer", "")
        if plain in weights:
            mapped[key] = weights[plain]
    missing, _ = pm.model.load_state_dict(mapped, strict=False)
    assert all(".paca_" in k for k in missing), missing


@pytest.mark.parametrize(
    "cfg",
    [
        paca.PacaConfig(r=3, seed=5),
        paca.PacaConfig(r=3, target_modules=["a", "q"], indices={"q": [15, 0, 7]}),
    ],
    ids=["random", "explicit"],
)
def test_indices_survive_meta_construction_and_to_empty(cfg):
    weights, ref = _reference(cfg)
    with torch.device("meta"):
        base = Net()
    pm = paca.wrap(base, cfg)  # a meta model is not moved (move_to_device has no values)
    assert all(layer.paca_idx["default"].is_meta for _, layer in pm.paca_layers())
    pm.to_empty(device="cpu")
    _load_base(pm, weights)
    for name, layer in pm.paca_layers():
        expected = ref.model.get_submodule(name).paca_idx["default"]
        got = layer.paca_idx["default"]
        assert got.device.type == "cpu" and got.dtype == torch.long
        assert torch.equal(got, expected), name
        assert int(torch.count_nonzero(layer.paca_delta["default"])) == 0, name
    x = torch.randn(2, 16)
    torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=0)


def test_weight_reading_strategies_on_meta_are_refused_clearly():
    with torch.device("meta"):
        base = Net()
    with pytest.raises(ValueError, match=r"selection='weight_norm' reads the weights.*meta"):
        paca.wrap(base, paca.PacaConfig(r=2, selection="weight_norm"))
    assert not any(isinstance(m, PacaLayer) for m in base.modules())


def test_merging_on_meta_is_refused_naming_the_modules():
    with torch.device("meta"):
        base = Net()
    pm = paca.wrap(base, paca.PacaConfig(r=2))
    with pytest.raises(ValueError, match=r"module 'a'.*meta device"):
        pm.merge()


def test_loaded_indices_are_what_to_empty_restores():
    _, pm = _reference(paca.PacaConfig(r=3, target_modules=["a"]))
    sd = pm.state_dict()
    sd["model.a.paca_idx.default"] = torch.tensor([1, 2, 3])
    pm.load_state_dict(sd)
    pm.to("meta")
    pm.to_empty(device="cpu")
    assert pm.model.a.paca_idx["default"].tolist() == [1, 2, 3]


def test_ordinary_moves_keep_indices_and_trained_deltas():
    _, pm = _reference(paca.PacaConfig(r=3, target_modules=["a"]))
    layer = pm.model.a
    with torch.no_grad():
        layer.paca_delta["default"].fill_(0.25)
    idx = layer.paca_idx["default"].clone()
    pm.to(torch.float64).to(torch.float32)
    assert torch.equal(layer.paca_idx["default"], idx)
    assert torch.equal(
        layer.paca_delta["default"], torch.full_like(layer.paca_delta["default"], 0.25)
    )
