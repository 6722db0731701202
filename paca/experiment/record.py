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

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

from paca import atomic
from paca.environment import cpu_model, git_commit, library_versions

EXPERIMENT_FILE = "experiment.toml"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (:func:`paca.atomic.write_text`)."""
    atomic.write_text(path, text)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def device_name(backend: Any, described: dict[str, Any]) -> str:
    """A human-readable device name: the backend's own, else torch's, else the type."""
    for key in ("device_name", "name", "device"):
        if described.get(key):
            name = str(described[key])
            if backend.device_type == "cpu" and name in {"x86_64", "aarch64", "arm64", "i386"}:
                return cpu_model() or name  # platform.processor() is only the ISA on Linux
            return name
    import torch

    if backend.device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return backend.device_type


def environment(backend: Any) -> dict[str, Any]:
    """Everything about the machine and software a comparison must state."""
    try:
        described = dict(backend.describe())
    except Exception as exc:  # describe() must never raise; record it if it does
        described = {"error": f"describe() raised {type(exc).__name__}: {exc}"}
    import torch

    return {
        "backend": backend.name,
        "device_type": backend.device_type,
        "device_name": device_name(backend, described),
        "describe": described,
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "git": git_commit(),
        "command": sys.argv,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
