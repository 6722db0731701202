"""save_pretrained / paca.load: adapter-only, exact, and strict about mismatches.

The save-as-a-unit guarantees (kills, failures, concurrency, permissions, formats) are in
tests/test_io_atomic.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import paca
import paca.io as pio
from paca import selection


class Mixed(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = Conv1D(hidden, 8)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x)).mean((2, 3))
        return self.head(torch.relu(self.proj(h)))


CFG = paca.PacaConfig(r=2, target_modules=["stem", "proj", "head"], seed=4)


def _trained(cfg: paca.PacaConfig = CFG, **kw) -> paca.PacaModel:
    model = paca.wrap(Mixed(), cfg, **kw)
    g = torch.Generator().manual_seed(0)
    for _, layer in model.paca_layers():
        with torch.no_grad():
            for d in layer.paca_delta.values():
                d.copy_(torch.randn(d.shape, generator=g))
    return model


def visible(folder) -> list[str]:
    """The names in ``folder`` a user sees (``ls``): not the hidden generation store."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))


def test_round_trip_is_bit_exact_and_adapter_only(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    assert visible(tmp_path) == [pio.WEIGHTS_NAME, pio.CONFIG_NAME]
    assert pio.WEIGHTS_NAME == "paca_adapter.safetensors"  # not PEFT's adapter_model.safetensors
    keys = set(load_file(tmp_path / pio.WEIGHTS_NAME))
    assert keys == {f"{m}.{k}" for m in ("stem", "proj", "head") for k in ("delta", "idx")}
    meta = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    assert meta["config"]["selection"] == "random" and meta["config"]["r"] == 2
    assert meta["modules"]["proj"]["weight_shape"] == [8, 16]
    assert meta["modules"]["stem"]["type"] == "torch.nn.modules.conv.Conv2d"

    loaded = paca.load(Mixed(), tmp_path)
    assert torch.equal(loaded(_x()), model(_x()))
    for (n, a), (_, b) in zip(model.paca_layers(), loaded.paca_layers(), strict=True):
        assert torch.equal(a.paca_idx["default"], b.paca_idx["default"]), n
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = paca.load(Mixed(), tmp_path, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 3


def test_saved_indices_are_authoritative(tmp_path, monkeypatch):
    model = _trained(paca.PacaConfig(r=2, target_modules=["stem", "proj", "head"],
                                     selection="weight_norm"))  # fmt: skip
    model.save_pretrained(tmp_path)
    want = {n: layer.paca_idx["default"].tolist() for n, layer in model.paca_layers()}

    def changed(name, module, r, seed, n, **_):
        return list(range(n - r, n))  # a strategy whose code "changed"

    monkeypatch.setitem(selection.STRATEGIES, "weight_norm", changed)
    loaded = paca.load(Mixed(), tmp_path)
    assert {n: layer.paca_idx["default"].tolist() for n, layer in loaded.paca_layers()} == want
    assert loaded.paca_config.selection == "weight_norm"  # recorded as configured


def test_gradient_selected_adapter_reloads_without_calibration_data(tmp_path):
    batches = [_x()]
    model = _trained(
        paca.PacaConfig(r=2, target_modules=["stem", "proj", "head"], selection="gradient"),
        calibration=batches,
        loss_fn=lambda out, batch: out.square().sum(),
    )
    model.save_pretrained(tmp_path)
    loaded = paca.load(Mixed(), tmp_path)
    assert torch.equal(loaded(_x()), model(_x()))


def test_mismatching_models_are_refused_with_what_differs(tmp_path):
    _trained().save_pretrained(tmp_path)
    with pytest.raises(pio.AdapterMismatchError, match=r"'proj' has weight shape \[8, 32\]"):
        paca.load(Mixed(hidden=32), tmp_path)

    class Bigger(Mixed):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Sequential(nn.Linear(4, 4))
            self.extra.head = nn.Linear(4, 4)  # matches the saved target "head" too

    with pytest.raises(pio.AdapterMismatchError, match=r"does not cover: \['extra.head'\]"):
        paca.load(Bigger(), tmp_path)

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.proj = nn.Conv2d(3, 8, 3), Conv1D(16, 8)
            self.head2 = nn.Linear(16, 4)

    with pytest.raises(pio.AdapterMismatchError, match="'head' does not exist"):
        paca.load(Renamed(), tmp_path)


def test_missing_or_unexpected_keys_are_errors(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    tensors = load_file(tmp_path / pio.WEIGHTS_NAME)
    for edit in ("drop", "add"):
        t = dict(tensors)
        if edit == "drop":
            del t["head.delta"]
        else:
            t["stray.delta"] = torch.zeros(1)
        body = {k: v for k, v in meta.items() if k != "fingerprint"}
        meta2 = {**body, "fingerprint": pio._fingerprint(t, body)}
        (tmp_path / pio.CONFIG_NAME).write_text(json.dumps(meta2))
        save_file(
            t, tmp_path / pio.WEIGHTS_NAME, metadata={"paca_fingerprint": meta2["fingerprint"]}
        )
        with pytest.raises(pio.AdapterMismatchError, match="head.delta" if edit == "drop" else
                           "stray.delta"):  # fmt: skip
            paca.load(Mixed(), tmp_path)


def test_mixed_or_corrupt_files_are_detected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _trained().save_pretrained(a)
    other = _trained()
    with torch.no_grad():
        other.model.head.paca_delta["default"].add_(1)
    other.save_pretrained(b)
    (a / pio.WEIGHTS_NAME).write_bytes((b / pio.WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="different saves"):
        paca.load(Mixed(), a)
    with pytest.raises(FileNotFoundError, match="missing paca_config.json"):
        paca.load(Mixed(), tmp_path)


def test_save_is_atomic_and_failure_keeps_the_old_files(tmp_path, monkeypatch):
    model = _trained()
    model.save_pretrained(tmp_path)
    old = (tmp_path / pio.WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        model.model.head.paca_delta["default"].add_(1)

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / pio.WEIGHTS_NAME).read_bytes() == old
    assert visible(tmp_path) == [pio.WEIGHTS_NAME, pio.CONFIG_NAME]
    assert not [p for p in (tmp_path / pio.STORE).iterdir() if p.name.startswith("tmp-")]
    monkeypatch.undo()
    model.save_pretrained(tmp_path)  # overwrites in place
    assert torch.equal(paca.load(Mixed(), tmp_path)(_x()), model(_x()))


def test_several_adapters_save_to_subdirectories_and_load_back(tmp_path):
    model = _trained()
    model.add_adapter("second", paca.PacaConfig(r=3, target_modules=["head"]))
    with torch.no_grad():
        model.model.head.paca_delta["second"].fill_(0.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / pio.WEIGHTS_NAME).is_file()
    loaded = paca.load(Mixed(), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(loaded(_x()), model(_x())), name
    with pytest.raises(ValueError, match="already exists"):
        loaded.load_adapter(tmp_path, "default")
    same = paca.load(loaded, tmp_path / "second", adapter_name="third")
    assert same is loaded and "third" in loaded.paca_configs


def test_transformers_style_kwargs(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path / "no", is_main_process=False)
    assert not (tmp_path / "no").exists()
    state = model.state_dict()
    state["model.head.paca_delta.default"] = torch.zeros_like(
        state["model.head.paca_delta.default"]
    )
    model.save_pretrained(tmp_path, state_dict=state, safe_serialization=True)
    assert torch.equal(load_file(tmp_path / pio.WEIGHTS_NAME)["head.delta"],
                       torch.zeros(4, 2))  # fmt: skip
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.save_pretrained(tmp_path, bogus=1)


@pytest.mark.slow
def test_hf_model_round_trip(tmp_path):
    from paca.tiny import tiny_llama

    model = paca.wrap(tiny_llama(layers=1), paca.PacaConfig(r=4))
    for _, layer in model.paca_layers():
        with torch.no_grad():
            layer.paca_delta["default"].normal_(0, 0.02)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 200, (2, 9))
    loaded = paca.load(tiny_llama(layers=1), tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(pio.AdapterMismatchError, match="does not cover"):
        paca.load(tiny_llama(layers=2), tmp_path)
