"""Run several experiments one after another and compare them: ``paca run`` x N + ``paca compare``.

    python -m paca.experiment.side_by_side                     # tiny (PaCA) vs tiny-lora (LoRA)
    python -m paca.experiment.side_by_side tiny tiny-lora --steps 50 --out report/

The default pair is the default job (``tiny``: PaCA r=16 on the shipped pretrained
``code-llama``, fine-tuned on Python's documentation) and ``tiny-lora`` (the same job
with LoRA at the matched trainable-parameter count, r=8, and its own tuned learning
rate). Each experiment writes its run folder under ``OUT/runs``; the comparison table
(``compare.md``, printed too) and plot (``compare.png``) go to ``OUT``. It is the same as

    paca run tiny --run-dir OUT/runs/tiny && paca run tiny-lora --run-dir OUT/runs/tiny-lora
    paca compare OUT/runs/tiny OUT/runs/tiny-lora --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_PAIR = ("tiny", "tiny-lora")


def run_side_by_side(
    experiments: list[str] | tuple[str, ...] = DEFAULT_PAIR,
    out: str | Path = "side-by-side",
    overrides: dict[str, Any] | None = None,
    backend: str | None = None,
    progress: bool = False,
    plot: bool = True,
) -> dict[str, Any]:
    """Run each experiment (a file or a shipped name) with ``overrides``; compare them."""
    from paca.experiment.compare import compare
    from paca.experiment.runner import run_experiment
    from paca.experiment.schema import load_experiment, resolve_experiment_path

    out = Path(out)
    folders = []
    for name in experiments:
        exp = load_experiment(resolve_experiment_path(name), overrides)
        folder = out / "runs" / exp.name
        if (folder / "summary.json").is_file():
            raise FileExistsError(
                f"{folder} already holds a run: choose another --out (runs are never overwritten)"
            )
        result = run_experiment(exp, backend=backend, run_dir=folder, progress=progress)
        folders.append(result.run_dir)
    return compare(folders, out, png=plot)


def main(argv: list[str] | None = None) -> int:
    import logging

    from paca.experiment.schema import parse_overrides

    p = argparse.ArgumentParser(
        prog="python -m paca.experiment.side_by_side",
        description="Run experiments one after another and write their comparison "
        "(compare.md, compare.png). Default: tiny (PaCA) vs tiny-lora (LoRA).",
    )
    p.add_argument("experiments", nargs="*", default=list(DEFAULT_PAIR))
    p.add_argument("--out", default="side-by-side", help="folder for runs/, compare.md/png")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (every experiment)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--backend", default=None)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = parse_overrides(args.overrides)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    try:
        result = run_side_by_side(
            args.experiments, args.out, overrides, args.backend, plot=not args.no_plot
        )
    except (ValueError, OSError, RuntimeError, TypeError) as exc:  # bad input: the message
        print(f"side_by_side: error: {exc}", file=sys.stderr)
        return 1
    print(result["table"])
    print(f"table: {result['markdown']}" + (f", plot: {result['png']}" if "png" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
