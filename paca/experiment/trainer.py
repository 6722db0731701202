"""Which Trainer runs an experiment, and the arguments it gets.

transformers' ``Trainer`` everywhere, except on an HPU backend with optimum-habana
installed, where ``GaudiTrainer`` takes over (lazy mode, HPU graphs, fused ops). The
GaudiTrainer is built by the one builder that lives with the HPU glue,
:func:`paca.integrations.habana.make_gaudi_trainer` (it refuses settings that cannot
work, hands lazy-mode step marking to the trainer, and gives it the PaCA GaudiConfig);
this module only turns the experiment into its arguments. optimum-habana is imported
only inside :func:`_gaudi_trainer`, so nothing else here needs it. Both trainers are
combined with :class:`paca.integrations.transformers.PacaTrainer`, whose checkpoints of
a :class:`paca.PacaModel` hold only the adapter (kilobytes, not the whole base model)
and reload it for ``resume_from_checkpoint``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paca.experiment.schema import Experiment, ExperimentError

logger = logging.getLogger("paca.experiment")


def trainer_kind(device_type: str, find_spec: Any = importlib.util.find_spec) -> str:
    """``"gaudi"`` on an HPU backend when optimum-habana is installed, else ``"hf"``."""
    if device_type != "hpu":
        return "hf"
    try:
        found = find_spec("optimum.habana") is not None
    except (ImportError, ValueError):  # "optimum" itself missing
        found = False
    if not found:
        logger.warning(
            "HPU backend without optimum-habana: using transformers' Trainer "
            "(pip install optimum-habana for GaudiTrainer's lazy mode and fused ops)"
        )
    return "gaudi" if found else "hf"


def common_arguments(exp: Experiment, output_dir: Path, device_type: str, lr_scale: float) -> dict:
    """Keyword arguments shared by ``TrainingArguments`` and ``GaudiTrainingArguments``."""
    t = exp.train
    if t.precision == "fp16" and device_type == "hpu":
        raise ExperimentError("[train].precision = 'fp16' is not supported on Gaudi; use 'bf16'")
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": t.steps if t.steps > 0 else -1,
        "num_train_epochs": t.epochs,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.eval_batch_size or t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr * lr_scale,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optimizer,
        "bf16": t.precision == "bf16",
        "fp16": t.precision == "fp16",
        "gradient_checkpointing": t.gradient_checkpointing,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if t.eval_steps else "no",
        "eval_steps": t.eval_steps or None,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_steps": t.save_steps or 500,
        "save_total_limit": t.save_total_limit,
        "seed": exp.seed,
        "data_seed": exp.seed,
        "report_to": [],
        "label_names": ["labels"],
        "remove_unused_columns": False,
        "dataloader_num_workers": t.dataloader_workers,
        "dataloader_pin_memory": device_type == "cuda",
        "use_cpu": device_type == "cpu",
        "include_num_input_tokens_seen": False,
    }
    if t.deepspeed:
        kwargs["deepspeed"] = t.deepspeed
    return kwargs


def build_trainer(
    exp: Experiment,
    kind: str,
    model: Any,
    args_kwargs: dict,
    backend: Any = None,
    **trainer_kwargs: Any,
) -> Any:
    """A Trainer (``kind`` from :func:`trainer_kind`) with PaCA-sized checkpoints.

    ``backend``: the paca backend the run computes with (a PacaModel's own by default;
    the GaudiTrainer checks it and hands it step marking)."""
    if kind == "gaudi":
        with _precision_env_kept():
            return _gaudi_trainer(exp, model, args_kwargs, backend, **trainer_kwargs)
    from transformers import TrainingArguments

    from paca.integrations.transformers import PacaTrainer

    with _precision_env_kept():
        args = TrainingArguments(**_checkpointing_key(TrainingArguments, args_kwargs))
        trainer = PacaTrainer(model=model, args=args, **trainer_kwargs)
    _check_device(trainer, model)
    return trainer


@contextlib.contextmanager
def _precision_env_kept() -> Iterator[None]:
    """Restore ``ACCELERATE_MIXED_PRECISION`` once the Trainer (and its Accelerator) exists.

    transformers 4.x ``TrainingArguments(bf16=True)`` (or fp16) writes it into
    ``os.environ`` and nothing resets it, so every later Trainer in the process, an fp32
    experiment included, would silently autocast too. (5.x does not write it.)
    """
    key = "ACCELERATE_MIXED_PRECISION"
    before = os.environ.get(key)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _checkpointing_key(args_cls: type, kwargs: dict) -> dict:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing``."""
    fields = getattr(args_cls, "__dataclass_fields__", {})
    if "activation_checkpointing" in fields and "gradient_checkpointing" in kwargs:
        kwargs = dict(kwargs)
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return kwargs


def _check_device(trainer: Any, model: Any) -> None:
    backend = getattr(model, "backend", None)
    if backend is not None and trainer.args.device.type != backend.device_type:
        raise RuntimeError(
            f"the Trainer would run on {trainer.args.device} but backend {backend.name!r} "
            f"computes on {backend.device_type!r}; pick a backend for this machine's "
            f"accelerator or set CUDA_VISIBLE_DEVICES/HABANA_VISIBLE_DEVICES accordingly"
        )


def check_lazy_mode(lazy_mode: bool, env_value: str | None) -> None:
    """``[hpu].lazy_mode`` must agree with ``PT_HPU_LAZY_MODE`` when that is set.

    The SDK reads the variable once, at import; its default changed from lazy (SW <= 1.20)
    to eager (SW >= 1.21), so only an explicit value can be checked here.
    """
    if env_value is None:
        return
    if lazy_mode and env_value == "0":
        raise ExperimentError(
            "[hpu].lazy_mode = true but PT_HPU_LAZY_MODE=0 (eager): unset it or set it to 1, "
            "or set [hpu].lazy_mode = false"
        )
    if not lazy_mode and env_value != "0":
        raise ExperimentError(
            f"[hpu].lazy_mode = false but PT_HPU_LAZY_MODE={env_value}: set "
            f"PT_HPU_LAZY_MODE=0 before the Gaudi SDK is imported"
        )


def _gaudi_trainer(
    exp: Experiment, model: Any, args_kwargs: dict, backend: Any, **trainer_kwargs: Any
) -> Any:
    """GaudiTrainer with GaudiTrainingArguments (optimum-habana's documented API), built
    by :func:`paca.integrations.habana.make_gaudi_trainer`."""
    from optimum.habana import GaudiTrainingArguments

    from paca.integrations.habana import (
        GaudiSettingsError,
        gaudi_config_for_paca,
        make_gaudi_trainer,
    )

    h = exp.hpu
    check_lazy_mode(h.lazy_mode, os.environ.get("PT_HPU_LAZY_MODE"))
    kwargs = {k: v for k, v in args_kwargs.items() if k not in {"use_cpu", "fp16"}}
    kwargs = _checkpointing_key(GaudiTrainingArguments, kwargs)
    args = GaudiTrainingArguments(
        use_habana=True,
        use_lazy_mode=h.lazy_mode,
        use_hpu_graphs_for_training=h.use_hpu_graphs_for_training,
        gaudi_config_name=h.gaudi_config or None,
        **kwargs,
    )
    gaudi_config = None  # [hpu].gaudi_config names one: GaudiTrainer reads it
    if not h.gaudi_config:
        # PaCA's GaudiConfig with the [hpu] flags; autocast only when [train].precision
        # asks for bf16 (use_torch_autocast=True would autocast an fp32 experiment too)
        gaudi_config = gaudi_config_for_paca(
            use_torch_autocast=exp.train.precision == "bf16",
            use_fused_adam=h.use_fused_adam,
            use_fused_clip_norm=h.use_fused_clip_norm,
        )
    try:
        return make_gaudi_trainer(
            model,
            args,
            gaudi_config,
            backend=backend,
            adapter_checkpoints=True,
            **trainer_kwargs,
        )
    except GaudiSettingsError as exc:
        raise ExperimentError(
            f"{exc} (paca run sets use_lazy_mode from [hpu].lazy_mode, bf16 from "
            f"[train].precision and deepspeed from [train].deepspeed)"
        ) from None
