"""Experiments: one TOML file, any backend, a complete run folder, and comparisons.

    from paca.experiment import load_experiment, run_experiment
    result = run_experiment(load_experiment("exp.toml"), backend="cpu")
    print(result.summary["eval_loss"], result.run_dir)

See ``docs/experiments.md`` for the file format and the run-folder layout.
"""

from __future__ import annotations

from paca.experiment.schema import (
    Experiment,
    ExperimentError,
    experiment_from_dict,
    load_experiment,
    loads_experiment,
    resolve_experiment_path,
    shipped_experiments,
)

__all__ = [
    "Experiment",
    "ExperimentError",
    "RunResult",
    "experiment_from_dict",
    "load_experiment",
    "loads_experiment",
    "resolve_experiment_path",
    "run_experiment",
    "shipped_experiments",
]


def __getattr__(name: str):  # the runner imports torch/transformers: load it on first use
    if name in {"run_experiment", "RunResult"}:
        from paca.experiment import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'paca.experiment' has no attribute {name!r}")
