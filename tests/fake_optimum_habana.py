"""A stand-in for optimum-habana's ``GaudiConfig``, ``GaudiTrainingArguments`` and
``GaudiTrainer``, for runs against the fake Gaudi SDK (``tests/fake_sdk``).

Only what paca relies on is copied, from optimum-habana's documented API and its
trainer (``optimum/habana/transformers/trainer.py``): in lazy mode ``GaudiTrainer``
calls ``htcore.mark_step()`` after every training step (forward + backward), after every
optimizer step, and after every prediction step of an evaluation. Each of those marks
is followed in the fake SDK's event log by a marker event (``gaudi:training_step``,
``gaudi:optimizer_step``, ``gaudi:prediction_step``), so a test can tell the trainer's
marks from paca's own. Training runs on the CPU (``use_cpu``): the fake SDK has no
``hpu`` tensor device.

``install()`` puts the modules ``optimum`` and ``optimum.habana`` into ``sys.modules``;
call it after :func:`fake_sdk.loader.load_fake_sdk`, in a subprocess (transformers
patches torch once it sees a Gaudi).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments


class GaudiConfig:
    """Attributes only, with optimum-habana's defaults."""

    def __init__(self, **kwargs: Any) -> None:
        self.use_torch_autocast = kwargs.pop("use_torch_autocast", False)
        self.use_fused_adam = kwargs.pop("use_fused_adam", False)
        self.use_fused_clip_norm = kwargs.pop("use_fused_clip_norm", False)
        self.__dict__.update(kwargs)

    @classmethod
    def from_pretrained(cls, name: str) -> GaudiConfig:
        config = cls()
        config.name = name
        return config


@dataclass
class GaudiTrainingArguments(TrainingArguments):
    use_habana: bool = False
    use_lazy_mode: bool = True
    use_hpu_graphs_for_training: bool = False
    gaudi_config_name: str | None = None

    def __post_init__(self) -> None:
        self.use_cpu = True  # the fake SDK computes on the CPU
        super().__post_init__()


def _mark(what: str) -> None:
    import habana_frameworks.torch.core as htcore
    from habana_frameworks._fake_events import record

    htcore.mark_step()
    record(f"gaudi:{what}")


class _MarkAfterOptimizerStep(TrainerCallback):
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.use_lazy_mode:
            _mark("optimizer_step")


class GaudiTrainer(Trainer):
    #: every GaudiTrainer built in this process, for the test to inspect
    built: list[GaudiTrainer] = []

    def __init__(self, model: Any = None, gaudi_config: Any = None, args: Any = None, **kw: Any):
        if gaudi_config is None:
            gaudi_config = GaudiConfig.from_pretrained(args.gaudi_config_name)
        self.gaudi_config = gaudi_config
        super().__init__(model=model, args=args, **kw)
        self.add_callback(_MarkAfterOptimizerStep())
        GaudiTrainer.built.append(self)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        if self.args.use_lazy_mode:
            _mark("training_step")
        return loss

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().prediction_step(*args, **kwargs)
        if self.args.use_lazy_mode:
            _mark("prediction_step")
        return out


def install() -> types.ModuleType:
    """Register ``optimum.habana`` (this stand-in) in ``sys.modules``; return it."""
    optimum = types.ModuleType("optimum")
    optimum.__path__ = []  # a package
    optimum.__spec__ = importlib.machinery.ModuleSpec("optimum", None, is_package=True)
    habana = types.ModuleType("optimum.habana")
    habana.__spec__ = importlib.machinery.ModuleSpec("optimum.habana", None)
    habana.GaudiConfig = GaudiConfig
    habana.GaudiTrainingArguments = GaudiTrainingArguments
    habana.GaudiTrainer = GaudiTrainer
    optimum.habana = habana
    sys.modules["optimum"] = optimum
    sys.modules["optimum.habana"] = habana
    return habana
