"""The embedded default job behind a bare ``paca run``: a real fine-tune, no downloads.

It is an ordinary experiment (the shipped ``paca/experiments/tiny.toml``) run by the same
runner as every experiment file: the shipped *pretrained* tiny LLaMA ``code-llama``
(trained on the standard library's Python source by ``benchmarks/evidence/pretrain.py``)
is fine-tuned with PaCA on a shifted domain, the English text of Python's own
documentation (``paca.data/python-docs``), and scored on documentation topics it never
saw. The held-out loss and next-byte accuracy before and after and the
trainable-parameter count are reported; ~20 s on 2 CPU cores. ``tiny-lora`` is the same
job with LoRA at the matched trainable-parameter count
(``python -m paca.experiment.side_by_side`` runs both and compares them).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from paca.experiment.schema import Experiment, load_experiment, shipped_experiments

logger = logging.getLogger("paca.quickstart")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_EXPERIMENT = "tiny"


def default_experiment_path() -> Path:
    """The shipped file of the default experiment."""
    return shipped_experiments()[DEFAULT_EXPERIMENT]


def default_experiment(overrides: dict[str, Any] | None = None) -> Experiment:
    """The default experiment, with dotted-key ``overrides`` (``{"train.steps": 20}``)."""
    return load_experiment(default_experiment_path(), overrides)


@dataclass
class QuickstartSettings:
    """The knobs of the default job most worth turning (the rest: ``tiny.toml``).

    ``None`` keeps the value in ``tiny.toml``.
    """

    steps: int | None = None
    batch_size: int | None = None
    r: int | None = None
    lr: float | None = None
    seed: int | None = None
    examples: int | None = None  # training chunks (0 = all)
    eval_examples: int | None = None  # held-out chunks scored before and after
    method: str | None = None  # "paca" (the file's), or "lora", "full", "frozen"

    def overrides(self) -> dict[str, Any]:
        keys = {
            "steps": "train.steps",
            "batch_size": "train.batch_size",
            "r": "method.r",
            "lr": "train.lr",
            "seed": "seed",
            "examples": "data.max_train_samples",
            "eval_examples": "data.max_eval_samples",
            "method": "method.name",
        }
        return {keys[k]: v for k, v in asdict(self).items() if v is not None}


def run_quickstart(
    settings: QuickstartSettings | None = None,
    backend: str | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune the pretrained default model; returns losses, counts and timings.

    ``run_dir``: where to keep the run folder (default: a temporary one, removed after).
    """
    from paca.experiment.runner import run_experiment

    s = settings or QuickstartSettings()
    exp = default_experiment(s.overrides())
    with tempfile.TemporaryDirectory(prefix="paca-quickstart-") as tmp:
        folder = Path(run_dir) if run_dir is not None else Path(tmp) / "run"
        result = run_experiment(exp, backend=backend, run_dir=folder, progress=progress)
    summary = result.summary
    seconds = summary.get("train_seconds") or float("nan")
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    return {
        "backend": summary["backend"],
        "model": exp.model.name,
        "data": exp.data.train,
        "settings": asdict(s),
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "loss_before": before,
        "loss_after": after,
        "perplexity_before": math.exp(before),
        "perplexity_after": math.exp(after),
        "accuracy_before": summary.get("eval_accuracy_before"),
        "accuracy_after": summary.get("eval_accuracy"),
        "train_seconds": seconds,
        "steps_per_second": summary["steps"] / seconds,
        "run_dir": str(result.run_dir) if run_dir is not None else None,
        "summary": summary,
    }
