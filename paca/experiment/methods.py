"""The four ways an experiment can fine-tune: ``paca``, ``lora`` (PEFT), ``full``, ``frozen``.

Each method returns the model the Trainer trains plus a function that saves what was
learned, so the runner treats them alike and comparisons use the same targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from paca.experiment.schema import ExperimentError, MethodSection

logger = logging.getLogger("paca.experiment")


@dataclass
class Prepared:
    """The model to train and how to save its trained part."""

    model: nn.Module
    trainable: int
    total: int
    lr_scale: float  # multiplies [train].lr (PaCA's alpha/r)
    save: Callable[[Path], Path | None]
    trains: bool = True  # False for "frozen": evaluated, never trained


def _counts(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def prepare_paca(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    import paca

    config = paca.PacaConfig(
        r=section.r,
        target_modules=section.target_modules,
        exclude_modules=section.exclude_modules or None,
        seed=section.seed if section.seed >= 0 else seed,
        selection=section.selection,
        modules_to_save=section.modules_to_save or None,
    )
    try:
        pm = paca.wrap(model, config, backend=backend)
    except paca.ModulesToSaveError as e:
        raise ExperimentError(f"[method].modules_to_save: {e}") from None

    def save(run_dir: Path) -> Path:
        folder = run_dir / "adapter"
        pm.save_pretrained(str(folder))  # modules_to_save copies included
        return folder

    trainable, total = pm.trainable_parameters()
    scale = section.alpha / section.r if section.alpha else 1.0
    return Prepared(pm, trainable, total, scale, save)


def prepare_lora(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("method 'lora' needs PEFT: pip install peft") from None
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha or section.r,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        exclude_modules=section.exclude_modules or None,
        modules_to_save=section.modules_to_save or None,
    )
    model = model.to(backend.device())
    peft_model = get_peft_model(model, config)

    def save(run_dir: Path) -> Path:
        folder = run_dir / "adapter"
        peft_model.save_pretrained(str(folder))
        return folder

    trainable, total = _counts(peft_model)
    return Prepared(peft_model, trainable, total, 1.0, save)


def prepare_full(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    model = model.to(backend.device())
    for p in model.parameters():
        p.requires_grad_(True)

    def save(run_dir: Path) -> Path:
        folder = run_dir / "model"
        saver = getattr(model, "save_pretrained", None)
        if saver is not None:
            saver(str(folder))
        else:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                str(folder / "model.safetensors"),
            )
        return folder

    trainable, total = _counts(model)
    return Prepared(model, trainable, total, 1.0, save)


def prepare_frozen(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    model = model.to(backend.device())
    for p in model.parameters():
        p.requires_grad_(False)
    _, total = _counts(model)
    return Prepared(model, 0, total, 1.0, lambda run_dir: None, trains=False)


METHOD_BUILDERS: dict[str, Callable[[nn.Module, MethodSection, int, Any], Prepared]] = {
    "paca": prepare_paca,
    "lora": prepare_lora,
    "full": prepare_full,
    "frozen": prepare_frozen,
}


def prepare(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    """Apply ``section.name`` to ``model``; the model ends up on ``backend``'s device."""
    prepared = METHOD_BUILDERS[section.name](model, section, seed, backend)
    logger.info(
        "method %s: %s of %s parameters trainable (%.3f%%)",
        section.name,
        f"{prepared.trainable:,}",
        f"{prepared.total:,}",
        100 * prepared.trainable / max(prepared.total, 1),
    )
    return prepared
