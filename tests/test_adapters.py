"""Several named adapters on Linear, Conv1D and Conv2d layers; optimizer hygiene."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import paca
from paca.layer import PacaLayer


class Mixed(nn.Module):
    """A conv stem, a Conv1D and a Linear: every supported layer type."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = Conv1D(16, 8)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x)).mean((2, 3))
        return self.head(torch.relu(self.proj(h)))


TARGETS = ["stem", "proj", "head"]


def _model(seed: int = 0) -> tuple[paca.PacaModel, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    base = Mixed()
    original = copy.deepcopy(base.state_dict())
    model = paca.wrap(base, paca.PacaConfig(r=2, target_modules=TARGETS, seed=1))
    model.add_adapter("other", paca.PacaConfig(r=3, target_modules=TARGETS, seed=2))
    g = torch.Generator().manual_seed(seed)
    for _, layer in model.paca_layers():
        with torch.no_grad():
            for d in layer.paca_delta.values():
                d.copy_(torch.randn(d.shape, generator=g) * 0.3)
    return model, original


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))


def _base_out(original: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    base = Mixed()
    base.load_state_dict(original)
    return base(x)


def _assert_original(model: nn.Module, original: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for k, v in original.items():
        assert torch.equal(state[k], v), k


def test_set_active_switches_outputs_and_trainability():
    model, original = _model()
    x = _x()
    y_default = model(x)
    model.set_adapter("other")
    y_other = model(x)
    assert not torch.equal(y_default, y_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{t}.paca_delta.other" for t in TARGETS}
    model.set_adapter("default")
    assert torch.equal(model(x), y_default)
    with model.disable_adapter():
        assert torch.equal(model(x), _base_out(original, x))
    with pytest.raises(KeyError, match="adapters: \\['default', 'other'\\]"):
        model.set_adapter("missing")


def test_delete_adapter_removes_it_everywhere():
    model, original = _model()
    x = _x()
    y_other = (model.set_adapter("other"), model(x))[1]
    model.set_adapter("default")
    model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.paca_configs) == ["other"]
    for _, layer in model.paca_layers():
        assert list(layer.paca_delta.keys()) == ["other"] and "default" not in layer.paca_idx
    assert torch.equal(model(x), y_other)
    _assert_original(model.unload(), original)


def test_merging_two_adapters_then_unmerge_is_exact():
    model, original = _model()
    x = _x()
    dense = Mixed()
    dense.load_state_dict(original)
    with torch.no_grad():  # reference: both adapters' column changes added in fp32
        for path, layer in model.paca_layers():
            mod = dense.get_submodule(path)
            w = layer.oi_view(mod.weight)
            for name in ("default", "other"):
                w[:, layer.paca_idx[name]] += layer.paca_delta[name]
    model.merge(["default", "other"])
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    model.unmerge()
    _assert_original(model.unload(), original)


def test_merge_and_unload_matches_adapter_outputs():
    model, _ = _model()
    x = _x()
    y = model(x)
    plain = model.merge_and_unload()
    assert type(plain) is Mixed
    assert not any(isinstance(m, PacaLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_safe_merge_refuses_nan_names_module_and_touches_nothing(target):
    model, original = _model()
    with torch.no_grad():
        model.model.get_submodule(target).paca_delta["default"].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=f"module '{target}'"):
        model.merge(safe_merge=True)
    assert all(not layer.merged_adapters for _, layer in model.paca_layers())
    _assert_original(model.unload(), original)


def test_unload_is_bit_exact_for_every_layer_type_after_training():
    model, original = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(_x()).square().sum().backward()
        opt.step()
        opt.zero_grad()
    model.merge()
    model.unmerge()
    _assert_original(model.unload(), original)


def _assert_base_unchanged(model: paca.PacaModel, original: dict[str, torch.Tensor]) -> None:
    for path, layer in model.paca_layers():
        for kind in ("weight", "bias"):
            assert torch.equal(getattr(layer.base_layer, kind), original[f"{path}.{kind}"]), path


def _effective(layer: PacaLayer, name: str) -> torch.Tensor:
    return layer.weight_oi().detach().float() + layer.delta_weight(name)


def test_weight_decay_only_shrinks_delta_and_never_moves_frozen_columns():
    """The authors' code stored absolute column values, so AdamW's decay pulled pretrained
    weights toward 0. Here decay acts on delta: with zero gradients it pulls the effective
    weight toward W (never toward 0), an all-zero delta stays W exactly, and columns that
    are not trained never change."""
    model, original = _model()
    layers = dict(model.paca_layers())
    with torch.no_grad():
        layers["head"].paca_delta["default"].zero_()
    before = {n: layer.paca_delta["default"].detach().clone() for n, layer in layers.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd, steps = 0.1, 0.5, 3
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    for _ in range(steps):
        for p in params:
            p.grad = torch.zeros_like(p)  # nothing to learn: only decay acts
        opt.step()
    _assert_base_unchanged(model, original)
    for name, layer in layers.items():
        idx = layer.paca_idx["default"]
        w = layer.weight_oi().detach().float()
        eff = _effective(layer, "default")
        if name == "head":
            assert torch.equal(eff, w)  # zero delta: exactly the pretrained weight
        # the pretrained part of the trained columns is intact; only the change decays
        torch.testing.assert_close(eff[:, idx] - w[:, idx], before[name] * (1 - lr * wd) ** steps)
        frozen = torch.ones(w.shape[1], dtype=torch.bool)
        frozen[idx] = False
        assert torch.equal(eff[:, frozen], w[:, frozen])


def test_training_and_grad_clipping_touch_only_deltas():
    model, original = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        model(_x()).square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) == len(params) == 3  # base weights get no gradient at all
        expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        torch.testing.assert_close(total, expected)
        opt.step()
        opt.zero_grad()
    _assert_base_unchanged(model, original)
    for _, layer in model.paca_layers():
        eff, w = _effective(layer, "default"), layer.weight_oi().detach().float()
        frozen = torch.ones(w.shape[1], dtype=torch.bool)
        frozen[layer.paca_idx["default"]] = False
        assert torch.equal(eff[:, frozen], w[:, frozen])
