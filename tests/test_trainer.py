"""transformers' Trainer trains a PaCA model; PacaTrainer checkpoints hold only the adapter."""

from __future__ import annotations

import pytest
import torch
from helpers import vit_projections
from transformers import Trainer, TrainingArguments

import paca
import paca.io as pio
from paca.integrations.transformers import PacaTrainer
from paca.tiny import tiny_llama

pytestmark = pytest.mark.slow

#: transformers 5 renamed ``gradient_checkpointing`` (TrainingArguments field, model method
#: and flag) to ``activation_checkpointing``; 4.x has only the old name. Use the newest.
CKPT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


class Rows(torch.utils.data.Dataset):
    """Sequences of a fixed repeating pattern (learnable in a few steps) plus an unused
    column, which Trainer must drop by looking at the wrapped model's forward."""

    def __init__(self, n: int = 16, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for _ in range(n):
            start = int(torch.randint(3, 20, (1,), generator=g))
            ids = (torch.arange(length) * 7 + start) % 50 + 3
            self.rows.append({"input_ids": ids, "labels": ids.clone(), "text": "unused"})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        max_steps=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _model() -> paca.PacaModel:
    return paca.wrap(tiny_llama(layers=1), paca.PacaConfig(r=8))


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {
            CKPT: True,
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 2,
            "bf16": True,
        },
        {CKPT: True, f"{CKPT}_kwargs": {"use_reentrant": True}},
    ],
    ids=["plain", "ckpt-accum-bf16", "reentrant-ckpt"],
)
def test_stock_trainer_trains_and_loss_decreases(tmp_path, opts):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(
        model=model, args=_args(tmp_path, **opts), train_dataset=Rows(), data_collator=_collate
    )
    trainer.train()
    assert getattr(model.model, f"is_{CKPT}") == bool(opts.get(CKPT))
    assert trainer.accelerator.mixed_precision == ("bf16" if opts.get("bf16") else "no")
    losses = _losses(trainer)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    for n, p in model.named_parameters():  # frozen weights stay bit-exact
        if n in before:
            assert torch.equal(p, before[n]), n
    for _, layer in model.paca_layers():
        assert layer.paca_delta["default"].abs().sum() > 0  # every delta got updates


def test_paca_trainer_checkpoints_contain_only_the_adapter_and_resume(tmp_path):
    model = _model()
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = PacaTrainer(model=model, args=args, train_dataset=Rows(), data_collator=_collate)
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    files = {p.name for p in ckpt.iterdir()}
    assert {pio.WEIGHTS_NAME, pio.CONFIG_NAME} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    tensors = pio.read_adapter(ckpt)[1]
    assert all(k.endswith((".delta", ".idx")) for k in tensors)
    n_adapter = sum(t.numel() for k, t in tensors.items() if k.endswith(".delta"))
    assert n_adapter == model.trainable_parameters()[0]

    # the checkpoint reloads exactly onto a fresh base model
    ids = Rows()[0]["input_ids"].unsqueeze(0)
    reloaded = paca.load(tiny_llama(layers=1), ckpt)
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)

    # resuming from step 2 restores that step's adapter before continuing
    fresh = _model()
    resumed = PacaTrainer(
        model=fresh, args=_args(tmp_path / "r", max_steps=4), train_dataset=Rows(),
        data_collator=_collate,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(model.paca_layers(), fresh.paca_layers(), strict=True):
        torch.testing.assert_close(
            a.paca_delta["default"], b.paca_delta["default"], rtol=1e-4, atol=1e-5, msg=name
        )


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the control
@pytest.mark.parametrize("via_paca", [True, False])
def test_reentrant_checkpointing_reaches_paca_layers_of_a_pixel_model(via_paca):
    """transformers only hooks the embeddings for ``input_ids`` models; for ViT with a frozen
    patch embedding, reentrant checkpointing would cut every delta off the graph."""
    from paca.tiny import tiny_vit

    targets = vit_projections(tiny_vit(layers=1), "q")
    model = paca.wrap(tiny_vit(layers=1), paca.PacaConfig(r=4, target_modules=targets))
    kwargs = {f"{CKPT}_kwargs": {"use_reentrant": True}}
    getattr(model if via_paca else model.model, f"{CKPT}_enable")(**kwargs)
    assert getattr(model.model, f"is_{CKPT}")
    model.train()
    pixels = torch.randn(2, 3, 32, 32)
    loss = model(pixel_values=pixels, labels=torch.tensor([0, 1])).loss
    if not via_paca:  # the control: the base model's own switch leaves the deltas cut off
        assert not loss.requires_grad
        return
    loss.backward()
    for _, layer in model.paca_layers():
        assert layer.paca_delta["default"].grad.abs().sum() > 0
