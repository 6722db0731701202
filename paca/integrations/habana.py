"""Glue for training a PaCA model with optimum-habana's ``GaudiTrainer`` (``pip install paca[hpu]``).

A :class:`~paca.model.PacaModel` is an ``nn.Module`` that forwards to the wrapped
transformers model, so ``GaudiTrainer`` can train it as it is. Three things need
care, and this module handles them:

* **who marks the steps.** In lazy mode ``GaudiTrainer`` calls ``htcore.mark_step()``
  after every training step (forward + backward) and after every optimizer step, and
  so does paca's HPU backend. :class:`PacaGaudiCallback` hands the marking to the
  trainer while it trains, so the graph is cut exactly where optimum-habana cuts it,
  and gives it back afterwards.
* **settings that cannot work with PaCA on Gaudi** (eager/lazy mismatch with the
  loaded bridge, ``torch.compile`` in lazy mode, fp16): :func:`check_gaudi_args` refuses
  them before training starts, saying what to change.
* **a GaudiConfig** matching the PaCA authors' Gaudi run (:func:`gaudi_config_for_paca`).

:func:`make_gaudi_trainer` does all three; it is the one GaudiTrainer builder, used by
your own scripts and by ``paca run`` on an HPU backend (which passes the settings of the
experiment's ``[hpu]`` section). optimum-habana imports the Gaudi SDK, so it is imported
only inside the functions that need it. None of this has run on a Gaudi; see
``docs/backends/hpu.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend

logger = logging.getLogger("paca")

INSTALL_HINT = "install it with `pip install paca[hpu]` (optimum-habana) on a Gaudi machine"

#: GaudiConfig used by the PaCA authors' Gaudi2 run (gaudi-paca/examples/run_lora_clm.py).
PACA_GAUDI_CONFIG: dict[str, Any] = {
    "use_torch_autocast": True,
    "use_fused_adam": False,
    "use_fused_clip_norm": True,
}


class GaudiSettingsError(ValueError):
    """GaudiTrainingArguments that cannot train a PaCA model on this machine."""


def gaudi_config_for_paca(**overrides: Any) -> Any:
    """An ``optimum.habana.GaudiConfig`` with :data:`PACA_GAUDI_CONFIG`, updated by ``overrides``."""
    try:
        from optimum.habana import GaudiConfig
    except ImportError as exc:
        raise ImportError(f"optimum-habana is not installed; {INSTALL_HINT}") from exc
    config = GaudiConfig()
    # GaudiConfig.__init__ only stores its keyword arguments as attributes: setting them
    # afterwards gives the same config (and works with stand-ins that take none).
    for key, value in {**PACA_GAUDI_CONFIG, **overrides}.items():
        setattr(config, key, value)
    return config


def _deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """ZeRO stage of a DeepSpeed config given as a dict or a JSON file path, if any."""
    if not deepspeed:
        return None
    config: Any = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        with open(deepspeed, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def check_gaudi_args(args: Any, backend: Backend) -> list[str]:
    """Refuse ``GaudiTrainingArguments`` that cannot train PaCA on ``backend``; return notes.

    ``args`` is read by attribute (``use_habana``, ``use_lazy_mode``, ``torch_compile``,
    ``torch_compile_backend``, ``fp16``, ``deepspeed``), so any object with those works.
    Raises :class:`GaudiSettingsError` naming the setting to change. The returned notes
    are harmless oddities worth logging.
    """
    problems: list[str] = []
    notes: list[str] = []
    if backend.name != "hpu":
        problems.append(
            f"the model computes with paca backend {backend.name!r}; wrap it with "
            "paca.wrap(model, config, backend='hpu') (or PACA_BACKEND=hpu) to train on Gaudi"
        )
    if not getattr(args, "use_habana", False):
        problems.append("use_habana is False; set use_habana=True (--use_habana) to train on Gaudi")
    lazy = "lazy" in backend.capabilities
    wants_lazy = bool(getattr(args, "use_lazy_mode", True))
    if backend.name == "hpu" and wants_lazy != lazy:
        mode = "lazy" if lazy else "eager"
        problems.append(
            f"use_lazy_mode={wants_lazy} but the Gaudi bridge was loaded in {mode} mode "
            f"(PT_HPU_LAZY_MODE={'1' if lazy else '0'}, fixed when habana_frameworks was "
            f"imported); pass use_lazy_mode={lazy} or restart with "
            f"PT_HPU_LAZY_MODE={'0' if lazy else '1'}"
        )
    if getattr(args, "torch_compile", False):
        if lazy:
            problems.append(
                "torch_compile=True needs eager mode: restart with PT_HPU_LAZY_MODE=0 and "
                "use_lazy_mode=False"
            )
        compile_backend = getattr(args, "torch_compile_backend", None)
        if compile_backend not in (None, "hpu_backend"):
            problems.append(
                f"torch_compile_backend={compile_backend!r}; on Gaudi use 'hpu_backend'"
            )
    if getattr(args, "fp16", False):
        problems.append("fp16 is not supported on Gaudi; use bf16=True")
    if _deepspeed_zero_stage(getattr(args, "deepspeed", None)) == 3:
        # DeepSpeed gathers the partitioned base weight when the PaCA layer reads it (an
        # external parameter of that layer) and again for backward: ZeRO-3 trains PaCA
        # exactly on DeepSpeed's CPU accelerator (tests/test_distributed_deepspeed.py).
        notes.append(
            "DeepSpeed ZeRO-3 with PaCA has run on CPU (DeepSpeed's CPU accelerator), not yet "
            "on Gaudi; ZeRO-2 (examples/deepspeed/ds_zero2_bf16.json) saves almost as much, "
            "since the PaCA deltas and their optimizer state are tiny"
        )
    if getattr(args, "use_hpu_graphs_for_training", False) and not lazy:
        notes.append("use_hpu_graphs_for_training has no effect in eager mode")
    if problems:
        raise GaudiSettingsError(
            "these GaudiTrainingArguments cannot train this PaCA model: " + "; ".join(problems)
        )
    return notes


class PacaGaudiCallback(TrainerCallback):
    """Lets ``GaudiTrainer`` alone mark the lazy-mode steps while it trains.

    On ``on_train_begin`` paca's own ``mark_step`` calls are switched off (the trainer
    already marks after each training step and each optimizer step); on
    ``on_train_end`` they are switched back on for code that runs afterwards.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._previous: bool | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "use_lazy_mode", False):
            self._previous = self.backend.step_hooks_enabled
            self.backend.step_hooks_enabled = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._previous is not None:
            self.backend.step_hooks_enabled = self._previous
            self._previous = None


def make_gaudi_trainer(
    model: Any,
    args: Any,
    gaudi_config: Any = None,
    *,
    backend: Backend | None = None,
    adapter_checkpoints: bool = False,
    **trainer_kwargs: Any,
) -> Any:
    """A ``GaudiTrainer`` for a :class:`~paca.model.PacaModel`, checked and wired for PaCA.

    ``args`` is a ``GaudiTrainingArguments``, checked by :func:`check_gaudi_args` (its
    notes are logged); :class:`PacaGaudiCallback` is added to the callbacks, so in lazy
    mode only the trainer marks the steps. ``gaudi_config``: a ``GaudiConfig``; by default
    the one ``args.gaudi_config_name`` names (GaudiTrainer reads it) or, without one,
    :func:`gaudi_config_for_paca`. ``backend``: the paca backend the run computes with,
    for a model that is not a PacaModel (a PEFT or fully fine-tuned model in ``paca
    run``); a PacaModel's own by default. ``adapter_checkpoints``: put
    :class:`~paca.integrations.transformers.PacaTrainer` in front of ``GaudiTrainer``, so
    checkpoints hold only the PaCA adapter (as ``paca run``'s do). Other keyword
    arguments go to ``GaudiTrainer``.
    """
    backend = backend if backend is not None else getattr(model, "backend", None)
    if backend is None:
        raise TypeError(
            f"make_gaudi_trainer expects a PacaModel (from paca.wrap), got "
            f"{type(model).__name__}; for another model pass backend= (the paca backend "
            f"it runs on)"
        )
    try:
        from optimum.habana import GaudiTrainer
    except ImportError as exc:
        raise ImportError(f"optimum-habana is not installed; {INSTALL_HINT}") from exc
    for note in check_gaudi_args(args, backend):
        logger.warning("GaudiTrainer: %s", note)
    if gaudi_config is None and not getattr(args, "gaudi_config_name", None):
        gaudi_config = gaudi_config_for_paca()
    trainer_cls = GaudiTrainer
    if adapter_checkpoints:
        from paca.integrations.transformers import PacaTrainer

        # PacaTrainer's overrides call super(), so they sit in front of GaudiTrainer's.
        trainer_cls = type("PacaGaudiTrainer", (PacaTrainer, GaudiTrainer), {})
    callbacks = [*(trainer_kwargs.pop("callbacks", None) or []), PacaGaudiCallback(backend)]
    return trainer_cls(
        model=model, args=args, gaudi_config=gaudi_config, callbacks=callbacks, **trainer_kwargs
    )
