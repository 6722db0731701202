"""The run folder: what ran (resolved experiment), where (environment), and how it went.

Layout of ``RUN_DIR``::

    experiment.toml   the resolved experiment (every key, defaults filled in)
    environment.json  backend + describe(), device name, library versions, git commit
    metrics.jsonl     one JSON object per Trainer log (train loss, lr, eval metrics)
    summary.json      final numbers; "status" is running/completed/interrupted/failed
    adapter/          what was learned (PaCA/LoRA adapter; model/ for full fine-tuning)
    checkpoints/      Trainer checkpoints, for resuming

Every file is written atomically (:mod:`paca.atomic`: temp file, fsync, rename), so a
killed run never leaves a half-written summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from paca import atomic, distributed
from paca.environment import device_name  # noqa: F401  (re-exported)
from paca.environment import record as environment  # noqa: F401  (the one environment record)

EXPERIMENT_FILE = "experiment.toml"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (:func:`paca.atomic.write_text`); on rank 0 only when
    several processes run one experiment (the others would write the same files)."""
    if distributed.is_writer():
        atomic.write_text(path, text)


def metrics_path(run_dir: Path) -> Path:
    """Where this process appends its Trainer logs: ``metrics.jsonl`` on rank 0, nowhere
    (``os.devnull``) on the other ranks, whose Trainers log the same rows."""
    return run_dir / METRICS_FILE if distributed.is_writer() else Path(os.devnull)


def parallelism(strategy: str | None) -> dict[str, Any]:
    """How many processes run the experiment and how they share the model, for
    ``summary.json`` and ``environment.json`` (``strategy`` is ``"single"`` for one)."""
    world = distributed.world_size()
    return {
        "world_size": world,
        "strategy": (strategy or "ddp") if world > 1 else (strategy or "single"),
        "nproc_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        "nodes": max(1, world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))),
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
