"""``paca run``: fine-tune. With no experiment file, the embedded default job."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="fine-tune (no arguments: the embedded tiny default job)")
    p.add_argument("--backend", default=None, help="cpu, cuda, hpu, a plugin's name, or auto")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paca.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings()
    if args.steps is not None:
        settings.steps = args.steps
    backend = None if args.backend in (None, "auto") else args.backend
    result = run_quickstart(settings, backend=backend)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"backend: {result['backend']}\n"
        f"trainable params: {result['trainable_params']:,} of {result['total_params']:,} "
        f"({100 * result['trainable_params'] / result['total_params']:.2f}%)\n"
        f"held-out loss: {result['loss_before']:.4f} -> {result['loss_after']:.4f}\n"
        f"{settings.steps} steps in {result['train_seconds']:.1f}s "
        f"({result['steps_per_second']:.2f} steps/s)"
    )
    return 0
