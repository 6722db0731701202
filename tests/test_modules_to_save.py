"""PacaConfig.modules_to_save: modules trained in full next to the adapter (PEFT's semantics)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import paca
import paca.io as pio
from paca.modules_to_save import ModulesToSaveWrapper


class Net(nn.Module):
    """A body PaCA adapts and a head trained in full (``num_labels`` outputs)."""

    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


CFG = paca.PacaConfig(r=2, target_modules=["body.0", "body.2"], modules_to_save=["head"])


def _x() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_step(model: paca.PacaModel, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(_x()).pow(2).mean() + model(_x()).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _trained(cfg: paca.PacaConfig = CFG, num_labels: int = 3) -> paca.PacaModel:
    model = paca.wrap(Net(num_labels), cfg)
    _train_step(model)
    return model


def test_only_the_copy_and_the_deltas_train():
    net = Net()
    before = _state(net)
    model = paca.wrap(net, CFG)
    wrapper = model.model.head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.body.0.paca_delta.default",
        "model.body.2.paca_delta.default",
        "model.head.modules_to_save.default.weight",
        "model.head.modules_to_save.default.bias",
    }
    n_train, _ = model.trainable_parameters()
    assert n_train == 2 * 16 + 2 * 16 + 16 * 3 + 3
    _train_step(model)
    assert not torch.equal(wrapper.modules_to_save["default"].weight, before["head.weight"])
    assert torch.equal(wrapper.original_module.weight, before["head.weight"])
    assert torch.equal(wrapper.original_module.bias, before["head.bias"])
    assert all(p.grad is None for p in wrapper.original_module.parameters())
    assert all(p.grad is None for p in model.model.norm.parameters())
    assert wrapper.weight is wrapper.modules_to_save["default"].weight  # attributes forward


def test_unload_is_bit_exact():
    net = Net()
    before = _state(net)
    with torch.no_grad():
        y0 = net(_x())
    model = paca.wrap(net, CFG)
    _train_step(model)
    base = model.unload()
    assert type(base.head) is nn.Linear
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in base.modules())
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(base(_x()), y0)


def test_merge_and_unload_keeps_the_trained_head():
    model = _trained()
    trained = model.model.head.modules_to_save["default"]
    with torch.no_grad():
        y = model(_x())
    merged = model.merge_and_unload()
    assert merged.head is trained and type(merged.head) is nn.Linear
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(_x()), y, rtol=1e-6, atol=1e-6)


def test_disable_adapter_uses_the_original_module():
    net = Net()
    with torch.no_grad():
        y0 = net(_x())
    model = paca.wrap(net, CFG)
    _train_step(model)
    with torch.no_grad():
        y = model(_x())
        with model.disable_adapter():
            assert torch.equal(model(_x()), y0)
            assert model.model.head.weight is model.model.head.original_module.weight
        assert torch.equal(model(_x()), y)


def test_save_load_round_trip_is_exact(tmp_path):
    model = _trained()
    with torch.no_grad():
        y = model(_x())
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / pio.WEIGHTS_NAME))
    assert {"head.modules_to_save.weight", "head.modules_to_save.bias"} <= keys
    meta = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    assert meta["config"]["modules_to_save"] == ["head"]
    assert meta["modules_to_save"]["head"] == {
        "type": "torch.nn.modules.linear.Linear",
        "tensors": {"weight": [3, 16], "bias": [3]},
    }

    loaded = paca.load(Net(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), y)
    assert not any(p.requires_grad for p in loaded.parameters())
    again = paca.load(Net(), tmp_path, is_trainable=True)
    copy = again.model.head.modules_to_save["default"]
    assert all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in again.model.head.original_module.parameters())

    # into an existing PacaModel, as a second adapter, and back into existing weights
    other = paca.wrap(Net(), CFG)
    other.load_adapter(tmp_path, "saved")
    other.set_adapter("saved")
    with torch.no_grad():
        assert torch.equal(other(_x()), y)
    fresh = paca.wrap(Net(), CFG)
    pio.load_adapter_weights(fresh, tmp_path, "default")
    with torch.no_grad():
        assert torch.equal(fresh(_x()), y)


def test_several_adapters_switch_copies_and_delete_unwraps():
    net = Net()
    with torch.no_grad():
        y0 = net(_x())
    model = paca.wrap(net, CFG)
    _train_step(model)
    model.add_adapter("plain", paca.PacaConfig(r=2, target_modules=["body.0"], seed=1))
    model.add_adapter("b", CFG)
    head = model.model.head
    assert sorted(head.modules_to_save) == ["b", "default"]
    model.set_adapter("b")
    assert head.active_module() is head.modules_to_save["b"]
    assert all(p.requires_grad for p in head.modules_to_save["b"].parameters())
    assert not any(p.requires_grad for p in head.modules_to_save["default"].parameters())
    model.set_adapter("plain")  # no copy: the original head, nothing of it trainable
    assert head.active_module() is head.original_module
    with torch.no_grad():
        assert torch.equal(head(torch.ones(1, 16)), head.original_module(torch.ones(1, 16)))
    model.set_adapter("default")
    model.delete_adapter("b")
    assert sorted(head.modules_to_save) == ["default"]
    model.delete_adapter("default")
    assert type(model.model.head) is nn.Linear  # no adapter trains it any more
    assert not any(p.requires_grad for p in model.model.head.parameters())
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(_x()), y0)


def test_unknown_name_is_an_error_with_close_names():
    net = Net()
    cfg = paca.PacaConfig(r=2, target_modules=["body.0"], modules_to_save=["haed"])
    with pytest.raises(paca.ModulesToSaveError, match=r"\['haed'\] match no module.*head"):
        paca.wrap(net, cfg)
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in net.modules())


def test_overlap_with_a_target_is_an_error_and_changes_nothing():
    net = Net()
    cfg = paca.PacaConfig(r=2, target_modules=["body.0", "head"], modules_to_save=["head"])
    with pytest.raises(paca.ModulesToSaveError, match="'head'.*also a PaCA target"):
        paca.wrap(net, cfg)
    cfg = paca.PacaConfig(r=2, target_modules=["body.0"], modules_to_save=["body"])
    with pytest.raises(paca.ModulesToSaveError, match=r"'body'.*contains \['body.0'\]"):
        paca.wrap(net, cfg)
    with pytest.raises(paca.ModulesToSaveError, match="exclude_modules"):
        paca.wrap(net, paca.PacaConfig(r=2, modules_to_save=["head"]))  # all-linear has head
    assert type(net.head) is nn.Linear and all(p.requires_grad for p in net.parameters())
    # across adapters: another adapter's target, or another adapter's full module
    model = paca.wrap(net, CFG)
    with pytest.raises(paca.ModulesToSaveError, match="already adapts"):
        cfg = paca.PacaConfig(r=2, target_modules=["body.2"], modules_to_save=["body.0"])
        model.add_adapter("x", cfg)
    with pytest.raises(paca.ModulesToSaveError, match="in modules_to_save of adapter"):
        model.add_adapter("y", paca.PacaConfig(r=2, target_modules=["head"]))
    assert sorted(model.paca_configs) == ["default"]
    assert sorted(model.model.head.modules_to_save) == ["default"]


def test_load_refuses_other_head_shapes_and_missing_tensors(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    with pytest.raises(
        paca.AdapterMismatchError,
        match=r"'head' \(modules_to_save\) has 'weight' of shape \[5, 16\]",
    ):
        paca.load(Net(num_labels=5), tmp_path)
    # a consistent save (fingerprint ok) that lacks one of the head's tensors
    meta = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    tensors = load_file(tmp_path / pio.WEIGHTS_NAME)
    del tensors["head.modules_to_save.bias"]
    meta.pop("fingerprint")
    fp = pio._fingerprint(tensors, meta)
    meta["fingerprint"] = fp
    save_file(tensors, str(tmp_path / pio.WEIGHTS_NAME), metadata={"paca_fingerprint": fp})
    (tmp_path / pio.CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(paca.AdapterMismatchError, match=r"missing keys \['head.modules_to_save"):
        paca.load(Net(), tmp_path)


def test_saved_copy_comes_from_a_given_state_dict_and_wrapper_deep_copies(tmp_path):
    import copy

    model = _trained()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.head.modules_to_save.default.bias"] = torch.full((3,), 7.0)
    model.save_pretrained(tmp_path, state_dict=sd)  # as transformers' Trainer passes one
    assert torch.equal(
        load_file(tmp_path / pio.WEIGHTS_NAME)["head.modules_to_save.bias"],
        sd["model.head.modules_to_save.default.bias"],
    )
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(_x()), model(_x()))
    assert (
        clone.model.head.modules_to_save["default"]
        is not model.model.head.modules_to_save["default"]
    )
