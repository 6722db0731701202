"""Selection strategies: weight_norm, gradient, user indices; reproducible, per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import paca
from paca.selection import column_norms, random_columns


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(20, 16)
        self.b = nn.Linear(16, 12)
        self.c = Conv1D(8, 12)  # weight stored (in=12, out=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _idx(model: paca.PacaModel, adapter: str = "default") -> dict[str, list[int]]:
    return {n: layer.paca_idx[adapter].tolist() for n, layer in model.paca_layers()}


def _oi(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def test_random_strategy_output_is_unchanged():
    model = paca.wrap(Net(), paca.PacaConfig(r=4, seed=3))
    assert _idx(model) == {n: random_columns(k, 4, 3, n).tolist() for n, k in
                           [("a", 20), ("b", 16), ("c", 12)]}  # fmt: skip


@pytest.mark.parametrize("largest", [True, False])
def test_weight_norm_picks_extreme_columns_per_layer(largest):
    net = Net()
    with torch.no_grad():  # make column norms distinct and known, Conv1D included
        net.c.weight.copy_(torch.linspace(0.1, 2.0, 12).unsqueeze(1).expand(12, 8))
    norms = {n: column_norms(_oi(m)) for n, m in net.named_children()}
    model = paca.wrap(
        net, paca.PacaConfig(r=3, selection="weight_norm", selection_options={"largest": largest})
    )
    got = _idx(model)
    for name, s in norms.items():
        order = torch.argsort(s, descending=largest)[:3]
        assert got[name] == sorted(order.tolist()), name
    want_c = [9, 10, 11] if largest else [0, 1, 2]  # rows of the (in, out) Conv1D weight
    assert got["c"] == want_c
    again = paca.wrap(Net(), paca.PacaConfig(r=3, selection="weight_norm"))
    assert _idx(again) == _idx(paca.wrap(Net(), paca.PacaConfig(r=3, selection="weight_norm")))


def test_weight_norm_on_conv2d_uses_whole_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3)
    with torch.no_grad():
        conv.weight[:, 2] *= 10
        conv.weight[:, 5] *= 5
    model = paca.wrap(
        nn.Sequential(conv),
        paca.PacaConfig(r=2, target_modules=["0"], selection="weight_norm"),
    )
    assert _idx(model) == {"0": [2, 5]}


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 20, generator=g) for _ in range(n)]


def _loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_gradient_strategy_matches_dense_gradient_norms():
    net = Net()
    ref = Net()
    for p in ref.parameters():
        p.grad = None
    for b in _batches():
        _loss(ref(b), b).backward()
    model = paca.wrap(
        net,
        paca.PacaConfig(r=4, selection="gradient"),
        calibration=_batches(),
        loss_fn=_loss,
    )
    got = _idx(model)
    for name, m in ref.named_children():
        s = column_norms(_oi(m).grad if not isinstance(m, Conv1D) else m.weight.grad.t())
        assert got[name] == sorted(torch.argsort(s, descending=True)[:4].tolist()), name
    # calibration left nothing behind: base weights frozen, no stale grads, adapter active
    assert all(p.grad is None for n, p in model.named_parameters() if "paca_delta" not in n)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.{m}.paca_delta.default" for m in ("a", "b", "c")
    ]
    assert len({tuple(v) for v in got.values()}) == 3  # distinct per layer


@pytest.mark.slow
def test_gradient_strategy_with_hf_loss_and_second_adapter():
    from paca.tiny import tiny_llama

    llama = tiny_llama(layers=1)
    model = paca.wrap(llama, paca.PacaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        for _, layer in model.paca_layers():
            layer.paca_delta["default"].normal_(0, 0.05)
    y_before = model(input_ids=ids).logits
    model.train()
    model.add_adapter(  # scores the pretrained model: v_proj's active delta stays out of it
        "grad",
        paca.PacaConfig(r=4, target_modules=["q_proj"], selection="gradient"),
        calibration=[{"input_ids": ids, "labels": ids}],
    )
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(input_ids=ids).logits, y_before)  # default still active
    attn = model.model.model.layers[0].self_attn
    assert attn.q_proj.paca_idx["grad"].numel() == 4 and "grad" not in attn.v_proj.paca_idx
    assert not attn.q_proj.disabled and not attn.v_proj.disabled
    assert attn.v_proj.paca_delta["default"].requires_grad


def test_gradient_strategy_needs_calibration_and_leaves_model_untouched():
    net = Net()
    with pytest.raises(ValueError, match="calibration"):
        paca.wrap(net, paca.PacaConfig(r=2, selection="gradient"))
    assert all(isinstance(m, (nn.Linear, Conv1D)) for m in net.children())  # rolled back
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="has no .loss"):
        paca.wrap(Net(), paca.PacaConfig(r=2, selection="gradient"), calibration=_batches())


def test_user_indices_per_module_override_the_strategy():
    cfg = paca.PacaConfig(r=3, selection="weight_norm", indices={"b": [7, 1, 4]})
    model = paca.wrap(Net(), cfg)
    got = _idx(model)
    assert got["b"] == [1, 4, 7]
    assert got["a"] == _idx(paca.wrap(Net(), paca.PacaConfig(r=3, selection="weight_norm")))["a"]
    with pytest.raises(ValueError, match="distinct"):
        paca.wrap(Net(), paca.PacaConfig(r=2, indices={"b": [1, 1]}))
    with pytest.raises(ValueError, match=r"not targets: \['nope'\]"):
        paca.wrap(Net(), paca.PacaConfig(r=2, indices={"nope": [1, 2]}))


def test_unknown_strategy_or_option_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown PaCA selection strategy 'norm'.*weight_norm"):
        paca.wrap(Net(), paca.PacaConfig(r=2, selection="norm"))
    with pytest.raises(ValueError, match=r"unknown selection_options \['largets'\].*largest"):
        paca.wrap(
            Net(),
            paca.PacaConfig(r=2, selection="weight_norm", selection_options={"largets": True}),
        )


def test_selection_options_must_be_json_because_they_are_saved():
    with pytest.raises(TypeError, match="JSON values.*paca.wrap"):
        paca.PacaConfig(selection="gradient", selection_options={"batches": [torch.zeros(2)]})
