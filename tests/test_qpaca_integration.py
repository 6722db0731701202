"""QPaCA with the ecosystem: stock PEFT loads the exported adapter onto the same 4-bit
base with equal outputs; transformers' Trainer trains a 4-bit tiny LLaMA with gradient
checkpointing; the conformance suite exercises the "nf4" capability."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import paca

bnb = pytest.importorskip("bitsandbytes")

from paca.layers_quant import PacaLinear4bit, quantize_nf4  # noqa: E402
from paca.tiny import tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(seed))


def _packed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace(".base_layer", ""): m.weight.data.clone()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def test_stock_peft_loads_the_export_onto_the_same_4bit_base_with_equal_outputs(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    base = quantize_nf4(tiny_llama(layers=1))
    peft_base = copy.deepcopy(base)
    pm = paca.wrap(base, paca.PacaConfig(r=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in pm.paca_layers():
            d = layer.paca_delta["default"]
            d.copy_(torch.randn(d.shape, generator=g) * 0.02)
        want = pm(input_ids=_ids()).logits
    paca.export_lora(pm, tmp_path)
    # train mode: bitsandbytes' eval-mode CPU forward repacks the weight (and needs
    # out_features divisible by 32, which the tiny MLP is not)
    peft_model = PeftModel.from_pretrained(peft_base, tmp_path).train()
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear4bit)  # PEFT's QLoRA layer, on the same packed weight
    with torch.no_grad():
        got = peft_model(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_trainer_with_gradient_checkpointing_trains_a_4bit_base(tmp_path):
    from transformers import Trainer, TrainingArguments

    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    rows = [{"input_ids": _ids(s)[0], "labels": _ids(s)[0]} for s in range(8)]
    model = paca.wrap(quantize_nf4(tiny_llama(layers=1)), paca.PacaConfig(r=8))
    assert all(isinstance(m, PacaLinear4bit) for _, m in model.paca_layers())
    before = _packed(model.model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        max_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **{ckpt: True},
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert getattr(model.model, f"is_{ckpt}")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for _, layer in model.paca_layers():
        assert layer.paca_delta["default"].abs().sum() > 0
    after = _packed(model.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_conformance_suite_checks_nf4_on_cpu():
    from paca.testing import check_backend

    report = check_backend("cpu", items=["nf4"])
    assert report["nf4"].status == "passed", report["nf4"].message


@pytest.mark.parametrize("method", ["paca", "lora"], ids=["qpaca", "qlora"])
def test_paca_run_trains_on_a_4bit_base_from_the_experiment_file(tmp_path, method):
    from paca.experiment import experiment_from_dict, run_experiment
    from paca.experiment.schema import ExperimentError

    exp = {
        "name": "q",
        "output_dir": str(tmp_path / "runs"),
        "model": {
            "name": "paca.tiny/tiny-llama",
            "quantization": "nf4",
            "options": {"hidden": 64, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 128},
        },
        "data": {"seq_len": 16, "max_train_samples": 16, "max_eval_samples": 4},
        "method": {"name": method, "r": 4},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "logging_steps": 1, "save_steps": 0},
    }
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = run_experiment(
            experiment_from_dict(exp), backend="cpu", run_dir=tmp_path / "r", progress=False
        )
    # the evaluation before training must not repack the 4-bit weights for CPU inference
    assert not [w for w in seen if "gemv_4bit" in str(w.message)]
    assert result.summary["status"] == "completed"
    assert (tmp_path / "r" / "adapter").is_dir()
    with pytest.raises(ExperimentError, match=r"quantization = 'nf4'.*'full'.*'paca' \(QPaCA\)"):
        experiment_from_dict({**exp, "method": {"name": "full"}})
    with pytest.raises(ExperimentError, match="quantization"):
        experiment_from_dict({**exp, "model": {**exp["model"], "quantization": "int8"}})
