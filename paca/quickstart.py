"""The embedded default job behind a bare ``paca run``: no downloads, a few minutes on CPU.

It is an ordinary experiment (the shipped ``paca/experiments/tiny.toml``): a tiny
LLaMA-architecture model built from a config (random init) fine-tuned with PaCA on the
built-in generated instruction data, through the same runner as every experiment file.
The held-out loss before and after and the trainable-parameter count are reported.
"""

from __future__ import annotations

import logging
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
    """The knobs of the default job most worth turning (the rest: ``tiny.toml``)."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 64
    r: int = 16
    lr: float = 3e-2
    seed: int = 0
    examples: int = 2000
    eval_batches: int = 4

    def overrides(self) -> dict[str, Any]:
        return {
            "train.steps": self.steps,
            "train.batch_size": self.batch_size,
            "data.seq_len": self.seq_len,
            "method.r": self.r,
            "train.lr": self.lr,
            "seed": self.seed,
            "data.max_train_samples": self.examples,
            "data.max_eval_samples": self.eval_batches * self.batch_size,
        }


def run_quickstart(
    settings: QuickstartSettings | None = None,
    backend: str | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune the tiny default model; returns losses, counts and timings.

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
    return {
        "backend": summary["backend"],
        "settings": asdict(s),
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "loss_before": summary["eval_loss_before"],
        "loss_after": summary["eval_loss"],
        "train_seconds": seconds,
        "steps_per_second": summary["steps"] / seconds,
        "run_dir": str(result.run_dir) if run_dir is not None else None,
        "summary": summary,
    }
