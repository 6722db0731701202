"""The four ways an experiment can fine-tune: ``paca``, ``lora`` (PEFT), ``full``, ``frozen``.

The model is built by the one method builder, :func:`paca.bench.methods.apply_method`,
that ``paca bench`` and the CUDA micro-benchmark use too, with the ``[method]``
section's options (LoRA alpha: ``[method].alpha``, else ``r``). :func:`prepare` returns
the model the Trainer trains plus a function that saves what was learned, so the runner
treats the methods alike and comparisons use the same targets.
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


def _build(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> nn.Module:
    """``model`` with ``section``'s method applied by the one builder, on ``backend``."""
    import paca
    from paca.bench.methods import apply_method

    try:
        return apply_method(
            section.name,
            model,
            r=section.r,
            targets=section.target_modules,
            backend=backend,
            seed=section.seed if section.seed >= 0 else seed,
            alpha=section.alpha or None,
            dropout=section.dropout,
            exclude=section.exclude_modules,
            modules_to_save=section.modules_to_save,
            selection=section.selection,
            task_type=None,  # a PeftModel of the model's own class (any task)
        )
    except paca.ModulesToSaveError as e:
        raise ExperimentError(f"[method].modules_to_save: {e}") from None


def _saver(model: nn.Module, folder_name: str) -> Callable[[Path], Path]:
    """Saves ``model`` (its ``save_pretrained``, else a safetensors state dict) into
    ``RUN_DIR/folder_name``: the adapter of a PaCA/PEFT model, the whole model otherwise."""

    def save(run_dir: Path) -> Path:
        folder = run_dir / folder_name
        saver = getattr(model, "save_pretrained", None)
        if saver is not None:
            saver(str(folder))  # a PaCA adapter includes its modules_to_save copies
        else:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                str(folder / "model.safetensors"),
            )
        return folder

    return save


def prepare_paca(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    pm = _build(model, section, seed, backend)
    trainable, total = pm.trainable_parameters()
    scale = section.alpha / section.r if section.alpha else 1.0
    return Prepared(pm, trainable, total, scale, _saver(pm, "adapter"))


def prepare_lora(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    peft_model = _build(model, section, seed, backend)
    trainable, total = _counts(peft_model)
    return Prepared(peft_model, trainable, total, 1.0, _saver(peft_model, "adapter"))


def prepare_full(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    model = _build(model, section, seed, backend)
    trainable, total = _counts(model)
    return Prepared(model, trainable, total, 1.0, _saver(model, "model"))


def prepare_frozen(model: nn.Module, section: MethodSection, seed: int, backend: Any) -> Prepared:
    model = _build(model, section, seed, backend)
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
