"""transformers ``Trainer`` support: checkpoints that hold only the PaCA adapter.

A stock ``Trainer`` already trains a :class:`~paca.model.PacaModel` (it forwards the
wrapped model's signature, ``config`` and checkpointing API, and PaCA's ops handle
autocast and gradient checkpointing), but it saves anything that is not a
``PreTrainedModel``/``PeftModel`` as a full ``model.safetensors``. The one line a user
changes is the class::

    from paca.integrations.transformers import PacaTrainer as Trainer

:class:`PacaTrainer` writes ``paca_adapter.safetensors`` + ``paca_config.json`` into
every checkpoint (and the final ``save_model``), and reads them back for
``resume_from_checkpoint`` and ``load_best_model_at_end``.

Under torchrun (docs/distributed.md) it also: turns DDP's ``find_unused_parameters`` off
for a PaCA model unless set (every delta is used in every forward; the stock Trainer
turns it on for any model that is not a ``PreTrainedModel``, which costs a graph walk
per step and makes DDP warn); checks that every rank trains the same PaCA setup
(:func:`paca.distributed.check_ranks_agree`); and under FSDP or DeepSpeed saves the
adapter by gathering only the deltas on every rank (rank 0 writes), instead of gathering
the whole model's state dict.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from paca import distributed
from paca.io import CONFIG_NAME, load_adapter_weights, read_adapter
from paca.model import PacaModel

logger = logging.getLogger("paca")

__all__ = ["PacaTrainer"]


def _paca_model(trainer: Trainer, model: nn.Module | None = None) -> PacaModel | None:
    m = model if model is not None else trainer.model
    try:
        unwrapped = trainer.accelerator.unwrap_model(m, keep_torch_compile=False)
    except TypeError:  # accelerate without keep_torch_compile
        unwrapped = trainer.accelerator.unwrap_model(m)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile'd
    return unwrapped if isinstance(unwrapped, PacaModel) else None


def _load_checkpoint_adapters(model: PacaModel, directory: str | os.PathLike[str]) -> None:
    """Overwrite every adapter of ``model`` with the one saved for it under ``directory``."""
    directory = Path(directory)
    top_name = read_adapter(directory)[0]["adapter_name"]
    for name in model.paca_configs:
        where = directory if name == top_name else directory / name
        if not (where / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"checkpoint {str(directory)!r} has no saved weights for adapter {name!r}"
            )
        load_adapter_weights(model, where, name)


class PacaTrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints contain only the PaCA adapter.

    It also takes the label names from the wrapped model's class (the stock Trainer looks
    at ``type(model).forward``, which for a PacaModel names no labels, so evaluation
    would report no loss unless ``TrainingArguments(label_names=["labels"])`` is set).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("model", args[0] if args else None)
        given = getattr(given, "_orig_mod", given)  # torch.compile'd
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if (
            isinstance(given, PacaModel)
            and training_args is not None
            and getattr(training_args, "ddp_find_unused_parameters", False) is None
        ):
            # Every delta takes part in every forward: nothing is unused (see module doc).
            training_args.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        model = _paca_model(self)
        if model is not None:
            inner = type(model.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(inner)
            self.can_return_loss = can_return_loss(inner)
            distributed.check_ranks_agree(model)  # a collective; no-op in one process

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, made safe to call after ``evaluate()`` under DDP.

        ``evaluate()`` prepares the model in accelerate's evaluation mode, which does not
        wrap it in DDP but marks it prepared; the ``train()`` after it then trains each
        rank on its own gradients without any all-reduce (transformers 5.x, accelerate
        1.x; found with ``paca run``, which evaluates before training). The mark is
        dropped here so that training wraps the model in DDP.
        """
        if (
            self.args.world_size > 1
            and self.model_wrapped is self.model
            and getattr(self.model, "_is_accelerate_prepared", False)
            and not (getattr(self, "is_deepspeed_enabled", False) or self.is_fsdp_enabled)
        ):
            del self.model._is_accelerate_prepared
        return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, also before training under DeepSpeed.

        Before ``train()`` the stock Trainer evaluates through a DeepSpeed *inference*
        engine: at ZeRO-1/2 DeepSpeed refuses that ("ZeRO inference only makes sense with
        ZeRO Stage 3"), and at ZeRO-3 ``train()`` then reuses that engine, which has no
        optimizer. A PaCA model is never partitioned before training (``paca.wrap``
        refuses a ``zero.Init`` model), so every rank holds all of it and it is evaluated
        as it is (the data still split over the ranks and the results gathered).
        """
        before_training = getattr(self, "is_deepspeed_enabled", False) and self.deepspeed is None
        if not before_training or distributed.is_sharded_model(self.model):
            return super().evaluate(*args, **kwargs)
        self.is_deepspeed_enabled = False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.is_deepspeed_enabled = True
            self.model.__dict__.pop("_is_accelerate_prepared", None)  # prepared for eval only

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP or DeepSpeed, gather only the adapter (every rank; rank 0 writes).

        The stock Trainer gathers the whole model's state dict to rank 0 first (or, under
        ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``, calls the save on
        rank 0 only, which would wait forever for the other ranks to gather the deltas).
        """
        model = _paca_model(self)
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(
            self, "is_deepspeed_enabled", False
        )
        if model is None or not sharded:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        logger.info("Saving PaCA adapter to %s (gathered from every rank)", output_dir)
        model.save_pretrained(output_dir)  # every rank gathers; rank 0 writes
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _paca_model(self)
        if model is None:  # not a PaCA model: the stock behaviour
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving PaCA adapter checkpoint to %s", output_dir)
        model.save_pretrained(output_dir, state_dict=_adapter_entries(state_dict))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        paca_model = _paca_model(self, model)
        if paca_model is None or not (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading PaCA adapter from %s", resume_from_checkpoint)
        _load_checkpoint_adapters(paca_model, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        paca_model = _paca_model(self)
        best = self.state.best_model_checkpoint
        if paca_model is None or best is None or not (Path(best) / CONFIG_NAME).is_file():
            return super()._load_best_model()
        logger.info("Loading best PaCA adapter from %s (score: %s)", best, self.state.best_metric)
        _load_checkpoint_adapters(paca_model, best)
        return None


def _adapter_entries(state_dict: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep only delta and modules_to_save-copy entries of a (possibly consolidated) state
    dict, if one was given."""
    if state_dict is None:
        return None
    return {k: v for k, v in state_dict.items() if ".paca_delta." in k or ".modules_to_save." in k}
