"""Merges are all or nothing; tied weights, untracked trainables and requires_grad.

Every refusal is checked twice: the message names the modules, and the base weights are
compared bit for bit with a copy taken before the call.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import paca
from paca.layer import PacaLayer
from paca.model import (
    MergeError,
    TiedWeightsError,
    TrainableOutsideAdapterError,
    UnknownAdapterError,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.relu(self.q_proj(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.lm_head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _base_weights(pm: paca.PacaModel) -> dict[str, torch.Tensor]:
    """Every tensor of the wrapped model that is not a PaCA delta/idx, cloned."""
    return {
        k: v.detach().clone()
        for k, v in pm.model.state_dict().items()
        if ".paca_delta." not in k and ".paca_idx." not in k
    }


def _assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k


def _wrapped(dtype: torch.dtype = torch.float32, **cfg) -> paca.PacaModel:
    torch.manual_seed(0)
    cfg.setdefault("target_modules", ["q_proj", "v_proj"])
    pm = paca.wrap(Net().to(dtype), paca.PacaConfig(r=4, **cfg))
    with torch.no_grad():
        for _, layer in pm.paca_layers():
            layer.paca_delta["default"].normal_(0, 0.1)
    return pm


# --- all or nothing ----------------------------------------------------------------
def test_safe_merge_fp16_overflow_in_a_late_layer_writes_nothing_anywhere():
    pm = _wrapped(torch.float16)
    with torch.no_grad():  # finite in the fp32 delta, but W + delta overflows fp16
        pm.model.blocks[2].v_proj.paca_delta["default"][0, 0] = 70000.0
    assert torch.isfinite(pm.model.blocks[2].v_proj.paca_delta["default"]).all()
    before = _base_weights(pm)
    with pytest.raises(MergeError) as err:
        pm.merge(safe_merge=True)
    msg = str(err.value)
    assert "module 'blocks.2.v_proj'" in msg and "torch.float16" in msg
    assert "nothing was written" in msg and "untouched" in msg
    assert "blocks.0" not in msg  # only the offending module is named
    _assert_same(before, _base_weights(pm))
    assert all(not layer.merged_adapters for _, layer in pm.paca_layers())


def test_safe_merge_names_every_offending_module():
    pm = _wrapped()
    with torch.no_grad():
        pm.model.blocks[0].q_proj.paca_delta["default"][1, 1] = float("nan")
        pm.model.blocks[2].v_proj.paca_delta["default"][0, 0] = float("inf")
    before = _base_weights(pm)
    with pytest.raises(MergeError, match="2 problem") as err:
        pm.merge(safe_merge=True)
    assert "module 'blocks.0.q_proj'" in str(err.value)
    assert "module 'blocks.2.v_proj'" in str(err.value)
    _assert_same(before, _base_weights(pm))


def test_merge_and_unload_refusal_keeps_the_model_wrapped_and_unchanged():
    pm = _wrapped(torch.float16)
    with torch.no_grad():
        pm.model.blocks[1].q_proj.paca_delta["default"][0, 0] = 1e6
    before = _base_weights(pm)
    with pytest.raises(MergeError, match=r"blocks\.1\.q_proj"):
        pm.merge_and_unload(safe_merge=True)
    assert sum(1 for _ in pm.paca_layers()) == 6
    _assert_same(before, _base_weights(pm))


def test_unsafe_merge_of_an_overflow_writes_it_as_asked():
    pm = _wrapped(torch.float16)
    with torch.no_grad():
        pm.model.blocks[1].q_proj.paca_delta["default"][0, 0] = 1e6
    pm.merge()  # safe_merge=False: no finiteness check (PEFT semantics)
    assert not torch.isfinite(pm.model.blocks[1].q_proj.base_layer.weight).all()
    pm.unmerge()
    assert torch.isfinite(pm.model.blocks[1].q_proj.base_layer.weight).all()


def test_a_backend_failing_mid_merge_leaves_every_layer_as_before(monkeypatch):
    pm = _wrapped()
    before = _base_weights(pm)
    backend = pm.backend
    real = type(backend).write_columns
    calls = {"n": 0}

    def flaky(weight, idx, columns):
        calls["n"] += 1
        if calls["n"] == 4:  # three layers written, then the fourth fails half way
            weight[:, idx[:1]] = 123.0
            raise RuntimeError("device lost")
        real(backend, weight, idx, columns)

    monkeypatch.setattr(backend, "write_columns", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        pm.merge()
    monkeypatch.setattr(backend, "write_columns", lambda w, i, c: real(backend, w, i, c))
    _assert_same(before, _base_weights(pm))
    assert all(not layer.merged_adapters for _, layer in pm.paca_layers())


def test_merging_two_adapters_on_shared_columns_is_exact_and_planned_in_order():
    pm = _wrapped()
    pm.add_adapter("other", paca.PacaConfig(r=4, target_modules=["q_proj", "v_proj"], seed=0))
    with torch.no_grad():
        for _, layer in pm.paca_layers():
            layer.paca_delta["other"].normal_(0, 0.1)
    before = _base_weights(pm)
    reference = {}
    for name, layer in pm.paca_layers():  # same seed: both adapters train the same columns
        assert torch.equal(layer.paca_idx["default"], layer.paca_idx["other"])
        w = layer.base_layer.weight.detach().clone()
        for a in ("default", "other"):
            idx = layer.paca_idx[a]
            w[:, idx] = (w[:, idx].float() + layer.paca_delta[a].float()).to(w.dtype)
        reference[name] = w
    pm.merge(["default", "other"])
    for name, layer in pm.paca_layers():
        assert torch.equal(layer.base_layer.weight, reference[name]), name
    pm.unmerge()
    _assert_same(before, _base_weights(pm))


@pytest.mark.parametrize("names", [["nope"], ["default", "nope"], "nope", [""]])
def test_unknown_adapter_names_are_errors_listing_the_adapters(names):
    pm = _wrapped()
    before = _base_weights(pm)
    with pytest.raises(UnknownAdapterError, match=r"adapters: \['default'\]"):
        pm.merge(names)
    with pytest.raises(KeyError):  # also a KeyError, as before
        pm.merge(names, safe_merge=True)
    _assert_same(before, _base_weights(pm))
    assert all(not layer.merged_adapters for _, layer in pm.paca_layers())


def test_unknown_adapter_suggests_a_close_name():
    pm = _wrapped()
    with pytest.raises(UnknownAdapterError, match="did you mean 'default'"):
        pm.merge(["defualt"])
    with pytest.raises(UnknownAdapterError, match=r"adapters: \['default'\]"):
        pm.set_adapter("defualt")
    with pytest.raises(UnknownAdapterError, match=r"adapters: \['default'\]"):
        pm.delete_adapter("nope")


def test_empty_adapter_list_is_refused_and_a_name_string_is_accepted():
    pm = _wrapped()
    with pytest.raises(ValueError, match="adapter_names is empty"):
        pm.merge([])
    pm.merge("default")
    assert all(layer.merged_adapters == ["default"] for _, layer in pm.paca_layers())


# --- tied weights ----------------------------------------------------------------
def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as on the hub
    return model


@pytest.mark.parametrize("targets", [["lm_head"], r".*(c_attn|lm_head)"])
def test_tied_gpt2_lm_head_is_refused_at_wrap_and_nothing_changes(targets):
    model = _gpt2()
    before = _snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TiedWeightsError) as err:
        paca.wrap(model, paca.PacaConfig(r=2, target_modules=targets))
    msg = str(err.value)
    assert "module 'lm_head'" in msg and "transformer.wte.weight" in msg
    assert "exclude_modules" in msg and "tie_word_embeddings = False" in msg
    assert "torch.nn.Parameter(model.lm_head.weight.detach().clone())" in msg
    assert not any(isinstance(m, PacaLayer) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    _assert_same(before, _snapshot(model))


def test_gpt2_all_linear_leaves_the_tied_head_alone_and_merges_correctly():
    model = _gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    pm = paca.wrap(model, paca.PacaConfig(r=2))
    assert "lm_head" not in {n for n, _ in pm.paca_layers()}
    with torch.no_grad():
        for _, layer in pm.paca_layers():
            layer.paca_delta["default"].normal_(0, 0.1)
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = pm(input_ids=ids).logits
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged.transformer.wte.weight, wte)


def test_untied_gpt2_lm_head_can_be_adapted_and_merged_without_touching_the_embedding():
    model = _gpt2()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    wte = model.transformer.wte.weight.detach().clone()
    pm = paca.wrap(model, paca.PacaConfig(r=2, target_modules=["lm_head"]))
    with torch.no_grad():
        pm.model.lm_head.paca_delta["default"].normal_(0, 1.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = pm(input_ids=ids).logits
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(merged.transformer.wte.weight, wte)


def test_untied_tensors_with_tie_word_embeddings_still_true_are_refused():
    model = _gpt2()  # transformers would re-tie on load and lose the merged head
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(TiedWeightsError, match=r"tie_word_embeddings=True.*re-ties"):
        paca.wrap(model, paca.PacaConfig(r=2, target_modules=["lm_head"]))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_two_targets_sharing_one_parameter_are_refused():
    m = Shared()
    m.b.weight = m.a.weight
    with pytest.raises(TiedWeightsError, match=r"module 'a'.*\['b.weight'\]"):
        paca.wrap(m, paca.PacaConfig(r=2, target_modules=["a", "b"]))


def test_a_target_sharing_with_a_non_target_module_is_refused():
    m = Shared()
    m.c.weight = m.emb.weight
    with pytest.raises(TiedWeightsError, match=r"module 'c'.*\['emb.weight'\].*exclude_modules"):
        paca.wrap(m, paca.PacaConfig(r=2, target_modules=["a", "c"]))
    pm = paca.wrap(m, paca.PacaConfig(r=2, target_modules=["a", "c"], exclude_modules=["c"]))
    assert [n for n, _ in pm.paca_layers()] == ["a"]


def test_a_weight_that_is_a_view_into_another_tensor_is_refused():
    m = Shared()
    big = nn.Parameter(torch.randn(32, 16))
    m.register_parameter("big", big)
    m.b.weight = nn.Parameter(big.data[16:])  # shares big's storage
    with pytest.raises(TiedWeightsError, match=r"module 'b'.*\['big'\]"):
        paca.wrap(m, paca.PacaConfig(r=2, target_modules=["b"]))
    m.a.weight = nn.Parameter(torch.randn(32, 16)[:16].clone())  # own memory: fine
    paca.wrap(m, paca.PacaConfig(r=2, target_modules=["a"]))


def test_one_module_object_under_two_parents_is_refused():
    m = Shared()
    m.d = m.a  # the same nn.Linear reachable as 'a' and 'd'
    with pytest.raises(TiedWeightsError, match=r"module 'a' is the same module object as \['d'\]"):
        paca.wrap(m, paca.PacaConfig(r=2, target_modules=["a"]))


def test_weights_tied_after_wrap_are_refused_at_merge_with_nothing_written():
    m = Shared()
    pm = paca.wrap(m, paca.PacaConfig(r=2, target_modules=["a", "b"]))
    with torch.no_grad():
        for _, layer in pm.paca_layers():
            layer.paca_delta["default"].fill_(0.5)
    pm.model.b.base_layer.weight = pm.model.a.base_layer.weight
    before = _base_weights(pm)
    with pytest.raises(TiedWeightsError, match="nothing was written"):
        pm.merge()
    _assert_same(before, _base_weights(pm))


# --- trainable parameters outside the adapter ------------------------------------------
def test_saving_with_an_unfrozen_bias_is_refused_and_writes_nothing(tmp_path):
    pm = _wrapped()
    pm.model.lm_head.bias.requires_grad_(True)
    with pytest.raises(TrainableOutsideAdapterError) as err:
        pm.save_pretrained(tmp_path / "out")
    msg = str(err.value)
    assert "['lm_head.bias']" in msg and "modules_to_save=['lm_head']" in msg
    assert "requires_grad_(False)" in msg
    assert not (tmp_path / "out").exists()
    pm.model.lm_head.bias.requires_grad_(False)
    pm.save_pretrained(tmp_path / "out")
    assert any((tmp_path / "out").iterdir())


def test_a_module_trained_in_full_via_modules_to_save_is_saved_not_refused(tmp_path):
    pm = _wrapped(modules_to_save=["lm_head"])
    assert pm.trainable_outside_adapters() == []
    pm.save_pretrained(tmp_path / "out")


def test_unfrozen_base_bias_of_a_paca_layer_is_named_without_internals():
    pm = _wrapped()
    pm.model.blocks[0].q_proj.base_layer.bias.requires_grad_(True)
    assert pm.trainable_outside_adapters() == ["blocks.0.q_proj.base_layer.bias"]
    with pytest.raises(TrainableOutsideAdapterError, match=r"\['blocks.0.q_proj.bias'\]"):
        pm.check_nothing_trainable_outside()


def test_unload_warns_about_parameters_trained_outside_the_adapter():
    pm = _wrapped()
    pm.model.lm_head.bias.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"lm_head\.bias.*stays in the returned model"):
        pm.unload()


# --- requires_grad restored ----------------------------------------------------------
def _mixed_grads(model: nn.Module) -> dict[str, bool]:
    for i, (_, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i % 3 != 0)
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_restores_requires_grad_exactly(how):
    torch.manual_seed(0)
    base = Net()
    grads = _mixed_grads(base)
    assert set(grads.values()) == {True, False}
    pm = paca.wrap(base, paca.PacaConfig(r=2, modules_to_save=["lm_head"]))
    assert all(
        not p.requires_grad for n, p in pm.named_parameters() if ".paca_delta." not in n
        and ".modules_to_save." not in n
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was trainable outside the adapter
        plain = getattr(pm, how)()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == grads


def test_unload_restores_requires_grad_with_tied_parameters_in_the_model():
    model = _gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    grads = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    plain = paca.wrap(model, paca.PacaConfig(r=2)).unload()
    assert {n: p.requires_grad for n, p in plain.named_parameters(remove_duplicate=False)} == grads


def test_unload_after_a_refused_merge_is_still_bit_exact():
    pm = _wrapped(torch.float16)
    original = copy.deepcopy(_base_weights(pm))
    with torch.no_grad():
        pm.model.blocks[2].q_proj.paca_delta["default"][0, 0] = 1e6
    with pytest.raises(MergeError):
        pm.merge(safe_merge=True)
    plain = pm.unload()
    restored = {k.replace(".base_layer", ""): v for k, v in original.items()}
    _assert_same(restored, _snapshot(plain))


def test_export_and_direct_saves_refuse_trainable_parameters_outside_the_adapter(tmp_path):
    import paca.io as pio
    from paca.model import TrainableOutsideAdapterError

    torch.manual_seed(0)
    model = paca.wrap(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
        paca.PacaConfig(r=2, target_modules=["0"]),
    )
    model.model[2].bias.requires_grad_(True)  # a bias the user unfroze
    with pytest.raises(TrainableOutsideAdapterError, match="2.bias"):
        paca.export_lora(model, tmp_path / "lora")
    with pytest.raises(TrainableOutsideAdapterError, match="2.bias"):
        pio.save_adapter(model, tmp_path / "direct", "default")
    assert not (tmp_path / "lora").exists() and not (tmp_path / "direct").exists()
