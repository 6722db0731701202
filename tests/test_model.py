"""Wrapping, disabling, merging and unloading keep the pretrained weights exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paca
from paca.layer import PacaLinear


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 32, bias=False)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.q_proj(x) + self.v_proj(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def _trained(config: paca.PacaConfig | None = None):
    torch.manual_seed(0)
    base = Tiny()
    original = copy.deepcopy(base.state_dict())
    model = paca.wrap(base, config or paca.PacaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for _, layer in model.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.5)
    return model, original


def test_wrap_targets_and_freezes():
    model, _ = _trained()
    names = [n for n, _ in model.paca_layers()]
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".paca_delta." in n for n in trainable) and len(trainable) == 4
    t, total = model.trainable_parameters()
    assert t == 4 * 32 * 4


def test_all_linear_skips_output_head():
    model = paca.wrap(Tiny(), paca.PacaConfig(r=2))
    names = {n for n, _ in model.paca_layers()}
    assert "lm_head" not in names and "blocks.0.mlp.0" in names and len(names) == 8


def test_regex_and_exclude():
    cfg = paca.PacaConfig(r=2, target_modules=r"blocks\.\d\.mlp\.\d", exclude_modules=["2"])
    model = paca.wrap(Tiny(), cfg)
    assert {n for n, _ in model.paca_layers()} == {"blocks.0.mlp.0", "blocks.1.mlp.0"}


def test_disable_and_unload_are_bit_exact():
    model, original = _trained()
    x = torch.randn(3, 32)
    base = Tiny()
    base.load_state_dict(original)
    expected = base(x)
    assert not torch.equal(model(x), expected)  # the adapter changes outputs
    with model.disable_adapter():
        assert torch.equal(model(x), expected)
    assert not torch.equal(model(x), expected)
    unloaded = model.unload()
    assert not any(isinstance(m, PacaLinear) for m in unloaded.modules())
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert torch.equal(unloaded(x), expected)


def test_merge_then_unmerge_restores_exactly_and_merge_matches_adapter():
    model, original = _trained()
    x = torch.randn(3, 32)
    y_adapter = model(x)
    model.merge()
    torch.testing.assert_close(model(x), y_adapter, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for k, v in model.unload().state_dict().items():
        assert torch.equal(v, original[k]), k


def test_merge_and_unload_gives_plain_model_with_adapter_outputs():
    model, _ = _trained()
    x = torch.randn(3, 32)
    y_adapter = model(x)
    merged = model.merge_and_unload()
    assert type(merged) is Tiny
    torch.testing.assert_close(merged(x), y_adapter, rtol=1e-5, atol=1e-5)


def test_bf16_merge_is_computed_in_fp32_and_unmerge_exact():
    torch.manual_seed(0)
    base = Tiny().to(torch.bfloat16)
    original = copy.deepcopy(base.state_dict())
    model = paca.wrap(base, paca.PacaConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.blocks[0].q_proj
    with torch.no_grad():
        layer.paca_delta["default"].fill_(1e-3)
    idx = layer.paca_idx["default"]
    expected = (original["blocks.0.q_proj.weight"][:, idx].float() + 1e-3).to(torch.bfloat16)
    model.merge()
    assert torch.equal(layer.base_layer.weight[:, idx], expected)
    model.unmerge()
    assert torch.equal(layer.base_layer.weight, original["blocks.0.q_proj.weight"])


def test_safe_merge_refuses_nan_and_leaves_weights_untouched():
    model, original = _trained()
    with torch.no_grad():
        model.model.blocks[1].v_proj.paca_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.v_proj"):
        model.merge(safe_merge=True)
    for k, v in model.unload().state_dict().items():
        assert torch.equal(v, original[k]), k


def test_errors_are_actionable():
    with pytest.raises(paca.TargetModulesNotFoundError, match="q_proj"):
        paca.wrap(Tiny(), paca.PacaConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match=r"r=64 does not fit module 'blocks\.0\.q_proj'.*32"):
        paca.wrap(Tiny(), paca.PacaConfig(r=64, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="positive int"):
        paca.PacaConfig(r=0)
    with pytest.raises(TypeError, match="GELU"):
        paca.wrap(Tiny(), paca.PacaConfig(r=2, target_modules=["mlp.1"]))
    model = paca.wrap(Tiny(), paca.PacaConfig(r=2))
    with pytest.raises(ValueError, match="already wrapped"):
        paca.wrap(model, paca.PacaConfig(r=2))
    with pytest.raises(ValueError, match="already wrapped"):
        paca.wrap(model.model, paca.PacaConfig(r=2))


def test_training_moves_only_selected_columns():
    model, original = _trained()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: lay.paca_delta["default"].detach().clone() for n, lay in model.paca_layers()}
    for _ in range(3):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(opt.state) == 4  # optimizer state only for the deltas
    for n, layer in model.paca_layers():
        assert not torch.equal(layer.paca_delta["default"], before[n])
        assert torch.equal(layer.base_layer.weight, original[f"{n}.weight"])


def test_misspelled_target_among_valid_ones_warns_with_suggestion():
    with pytest.warns(UserWarning, match=r"\['q_prj'\] matched no module.*q_proj"):
        paca.wrap(Tiny(), paca.PacaConfig(r=2, target_modules=["q_prj", "v_proj"]))


def test_deleting_the_only_adapter_is_refused():
    model = paca.wrap(Tiny(), paca.PacaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only one.*unload"):
        model.delete_adapter("default")
    assert model.paca_config.r == 2
