"""export_lora writes an adapter that stock PEFT loads and that reproduces PaCA's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import vit_projections
from torch import nn

import paca
from paca.tiny import tiny_gpt2, tiny_llama, tiny_vit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # importing peft alone takes seconds


def _randomize(model: paca.PacaModel, std: float) -> None:
    g = torch.Generator().manual_seed(0)
    for _, layer in model.paca_layers():
        with torch.no_grad():
            d = layer.paca_delta["default"]
            d.copy_(torch.randn(d.shape, generator=g) * std)


def _peft_lora_params(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def _check(build, config: paca.PacaConfig, inputs: dict, tmp_path, std: float = 0.05) -> None:
    model = paca.wrap(build(), config)
    _randomize(model, std)
    out = paca.export_lora(model, tmp_path)
    assert out == tmp_path and (tmp_path / "adapter_config.json").is_file()
    base = build()
    with torch.no_grad():
        y_base = base(**inputs).logits
    lora = peft.PeftModel.from_pretrained(base, tmp_path)
    # PEFT only warns about missing keys: check that every LoRA weight was loaded
    n_layers = len(list(model.paca_layers()))
    assert len(_peft_lora_params(lora)) == 2 * n_layers
    for path, layer in model.paca_layers():
        b = lora.base_model.model.get_submodule(path).lora_B["default"].weight
        assert torch.equal(b.reshape(-1), layer.paca_delta["default"].detach().reshape(-1)), path
    with torch.no_grad():
        y_paca = model(**inputs).logits
        y_lora = lora(**inputs).logits
    assert (y_paca - y_base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(y_lora, y_paca, rtol=1e-5, atol=1e-5)


def test_linear_llama_export_matches(tmp_path):
    ids = torch.randint(3, 200, (2, 11))
    cfg = paca.PacaConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    _check(lambda: tiny_llama(layers=1), cfg, {"input_ids": ids}, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["r"] == conf["lora_alpha"] == 4 and conf["rank_pattern"] == {}


def test_conv1d_gpt2_export_matches(tmp_path):
    ids = torch.randint(3, 200, (2, 11))
    _check(lambda: tiny_gpt2(layers=1), paca.PacaConfig(r=4), {"input_ids": ids}, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"]


def test_conv2d_vit_export_matches_with_per_position_rank(tmp_path):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = ["projection", *vit_projections(tiny_vit(layers=1), "q", "v")]
    cfg = paca.PacaConfig(r=2, target_modules=targets)
    _check(lambda: tiny_vit(layers=1), cfg, {"pixel_values": pixels}, tmp_path, std=0.2)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(conf["rank_pattern"].values()) == [2 * 8 * 8]  # r * kh * kw for the 8x8 patches
    assert conf["alpha_pattern"] == conf["rank_pattern"]


def test_dilated_conv_export_is_refused(tmp_path):
    net = nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2))
    model = paca.wrap(net, paca.PacaConfig(r=2, target_modules=["0"]))
    with pytest.raises(paca.ExportError, match="'0'.*dilation"):
        paca.export_lora(model, tmp_path)


def test_modules_to_save_new_head_exports_as_peft_modules_to_save(tmp_path):
    """A new 5-class head (the tiny "pretrained" ViT has 10) trained in full next to the
    adapter comes back through stock PEFT's modules_to_save."""
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    def build() -> nn.Module:
        return tiny_vit(layers=1, num_labels=5)

    targets = vit_projections(build(), "q", "v")
    cfg = paca.PacaConfig(r=2, target_modules=targets, modules_to_save=["classifier"])
    model = paca.wrap(build(), cfg)
    _randomize(model, 0.05)
    head = model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5)))
        head.bias.add_(1.0)
    paca.export_lora(model, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["classifier"]
    lora = peft.PeftModel.from_pretrained(build(), tmp_path)
    assert len(_peft_lora_params(lora)) == 2 * len(list(model.paca_layers()))
    peft_head = lora.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(peft_head.weight, head.weight) and torch.equal(peft_head.bias, head.bias)
    with torch.no_grad():
        y_paca = model(pixel_values=pixels).logits
        y_lora = lora(pixel_values=pixels).logits
        with model.disable_adapter():
            y_base = model(pixel_values=pixels).logits
    assert y_paca.shape == (2, 5) and (y_paca - y_base).abs().max() > 1e-2
    torch.testing.assert_close(y_lora, y_paca, rtol=1e-5, atol=1e-5)


def test_re_export_replaces_the_previous_one_and_peft_never_reads_a_paca_folder(tmp_path):
    """Exporting again into an export folder replaces it as a unit; stock PEFT refuses a
    PaCA folder outright instead of running the unadapted base model; paca refuses to
    mix the two formats in one folder."""
    ids = torch.randint(3, 200, (2, 7))
    cfg = paca.PacaConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = paca.wrap(tiny_llama(layers=1), cfg)
    _randomize(model, 0.05)
    paca.export_lora(model, tmp_path / "lora")
    _randomize(model, 0.3)  # a different adapter, exported over the first
    paca.export_lora(model, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir() if p.name[0] != ".") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    lora = peft.PeftModel.from_pretrained(tiny_llama(layers=1), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(
            lora(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    model.save_pretrained(tmp_path / "paca")
    with pytest.raises(ValueError, match="adapter_config.json"):  # PEFT: no config, no model
        peft.PeftModel.from_pretrained(tiny_llama(layers=1), tmp_path / "paca")
    with pytest.raises(paca.io.AdapterFormatError):
        paca.export_lora(model, tmp_path / "paca")
    with pytest.raises(paca.io.AdapterFormatError):
        model.save_pretrained(tmp_path / "lora")
