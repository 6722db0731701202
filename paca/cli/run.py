"""``paca run``: fine-tune as an experiment file says (no file: the embedded tiny default).

paca run                               # tiny default job, a few minutes on CPU
paca run exp.toml --backend hpu        # one experiment, any backend
paca run llama3-8b-oasst1              # a shipped experiment, by name
paca run exp.toml --set train.steps=50 --set method.name=lora
paca run --resume runs/exp-cpu-20250101-120000
paca run exp.toml --nproc 2            # 2 local ranks (torchrun), DDP; docs/distributed.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from paca.cli.common import UsageError, output_folder


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="fine-tune from an experiment file (no file: the embedded tiny default job)",
        description="Train an experiment and write a run folder (config, environment, "
        "metrics.jsonl, summary.json, adapter). Without EXPERIMENT, the embedded tiny default.",
    )
    p.add_argument(
        "experiment", nargs="?", default=None,
        help="experiment TOML file, or the name of a shipped one (see docs/experiments.md)",
    )  # fmt: skip
    p.add_argument("--backend", default=None, help="cpu, cuda, hpu, a plugin's name, or auto")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the file)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a key, e.g. --set train.lr=1e-3 (VALUE is read as TOML; repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--run-dir", default=None, help="run folder (default: OUTPUT_DIR/NAME-BACKEND-TIME)"
    )
    p.add_argument("--output-dir", default=None, help="parent of run folders (overrides the file)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="continue the run in RUN_DIR from its last checkpoint",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help="train on N local processes: starts torchrun (python -m torch.distributed.run) "
        "with N ranks; [train].batch_size is the global batch (docs/distributed.md)",
    )  # fmt: skip
    p.add_argument(
        "--strategy", choices=["ddp", "fsdp2", "deepspeed"], default=None,
        help="how the ranks share the model: ddp (default), fsdp2, or deepspeed "
        "([train].deepspeed config, else ZeRO-2)",
    )  # fmt: skip
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set`` items as experiment overrides: :func:`paca.experiment.schema.parse_overrides`
    (imported on use, so ``paca --help`` does not load the schema)."""
    from paca.experiment.schema import parse_overrides

    return parse_overrides(items)


def run(args: argparse.Namespace) -> int:
    from paca.experiment.schema import load_experiment
    from paca.quickstart import default_experiment

    if args.backend is not None and not args.backend.strip():
        raise UsageError(
            "--backend is empty; give a backend name (cpu, cuda, hpu, a plugin's) or auto"
        )
    if args.output_dir is not None:
        output_folder(args.output_dir, "--output-dir", "run folders")
    overrides = parse_overrides(args.overrides)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.resume:
        if args.experiment or overrides:
            raise ValueError("--resume continues a run as it was: give no EXPERIMENT or --set")
        exp = None
    elif args.experiment is None:
        exp = default_experiment(overrides)
    else:
        path = experiment_file(args.experiment)
        try:
            exp = load_experiment(path, overrides)
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{path} is not a UTF-8 text file, so not an experiment: {exc}"
            ) from None
    if args.run_dir is not None and not args.resume:
        output_folder(args.run_dir, "--run-dir", "the run (config, metrics, adapter)")
    if args.resume:
        folder = Path(args.resume)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--resume {folder} is a file; give the run folder to continue")

    if args.resume and args.nproc is None:
        args.nproc = _recorded_world_size(Path(args.resume))  # resume as it ran
    if args.nproc is not None:
        return _launch(args, exp)

    from paca import distributed
    from paca.experiment.runner import run_experiment

    # --json: stdout is for the summary only; libraries that print there while the run
    # imports them (DeepSpeed's accelerator notice, once accelerate finds it installed)
    # print to stderr instead.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        result = run_experiment(
            exp,
            backend=args.backend,
            run_dir=args.resume or args.run_dir,
            resume=bool(args.resume),
            progress=not (args.no_progress or args.json),
            strategy=args.strategy,
        )
    if not distributed.is_writer():
        return 0  # rank 0 prints the summary
    s = result.summary
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), **s}, indent=2, default=str))
        return 0
    print(format_summary(s, str(result.run_dir)))
    return 0


def _recorded_world_size(folder: Path) -> int | None:
    """The world size a run folder recorded, when it ran on several ranks (else None)."""
    from paca import distributed

    try:
        world = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(world, int) or world <= 1 or distributed.under_torchrun():
        return None
    return world


def _launch(args: argparse.Namespace, exp: Any) -> int:
    """``--nproc N``: the same ``paca run`` on N ranks under torchrun (N=1: in-process)."""
    from paca import distributed
    from paca.experiment.runner import _select_backend, default_run_dir

    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc == 1 and args.strategy != "deepspeed":  # DeepSpeed needs its launcher
        args.nproc = None
        return run(args)
    run_dir = args.run_dir
    if run_dir is None and not args.resume:  # one folder for all ranks, named once here
        run_dir = str(default_run_dir(exp, _select_backend(args.backend or exp.backend).name))
    argv = ["-v"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []
    argv.append("run")
    argv += [args.experiment] if args.experiment and not args.resume else []
    for flag, value in (
        ("--backend", args.backend),
        ("--steps", args.steps),
        ("--output-dir", args.output_dir),
        ("--strategy", args.strategy),
    ):
        argv += [flag, str(value)] if value is not None else []  # fmt: skip
    for item in args.overrides:
        argv += ["--set", item]
    argv += ["--resume", args.resume] if args.resume else ["--run-dir", run_dir]
    argv += ["--no-progress"] if args.no_progress else []
    argv += ["--json"] if args.json else []
    code = distributed.launch(args.nproc, argv)
    if code != 0:
        raise RuntimeError(
            f"the {args.nproc} ranks of paca run did not all succeed (torchrun exit status "
            f"{code}); the first rank's error is printed above"
            + ("" if args.resume else f"; the run folder is {run_dir}")
        )
    return 0


def experiment_file(name: str) -> Path:
    """The experiment file ``name`` names: a path, or a shipped experiment's name."""
    from paca.experiment.schema import resolve_experiment_path, shipped_experiments

    path = resolve_experiment_path(name)
    if path.is_dir():
        raise UsageError(
            f"{name} is a folder, not an experiment file; give a .toml file (to continue the "
            f"run in a run folder: paca run --resume {name})"
        )
    if not path.exists():
        shipped = ", ".join(sorted(shipped_experiments())) or "none"
        raise UsageError(
            f"no experiment file {name!r} and no shipped experiment of that name; give the "
            f"path of a .toml file, or one of: {shipped} (docs/experiments.md)"
        )
    return path


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_summary(s: dict[str, Any], run_dir: str) -> str:
    """A short human summary of a finished run."""
    lines = [
        f"backend: {s['backend']} ({s.get('device', '?')}), method: {s['method']}",
        f"trainable params: {s['trainable_params']:,} of {s['total_params']:,} "
        f"({s['trainable_percent']:.2f}%)",
    ]
    if s.get("eval_loss") is not None:
        lines.append(
            f"held-out loss: {_num(s.get('eval_loss_before'), '.4f')} -> {s['eval_loss']:.4f}"
            f"   accuracy: {_num(s.get('eval_accuracy_before'), '.3f')} -> "
            f"{_num(s.get('eval_accuracy'), '.3f')}"
        )
    step_ms = s.get("step_time_median_s")
    lines.append(
        f"{s.get('steps', 0)} steps in {s.get('train_seconds', 0):.1f}s; median step "
        f"{_num(step_ms * 1000 if step_ms else None, '.1f')} ms, "
        f"{_num(s.get('tokens_per_second'), ',.0f')} tokens/s, peak memory "
        + (f"{s['peak_memory_bytes'] / 2**20:,.0f} MiB" if s.get("peak_memory_bytes") else "n/a")
    )
    lines.append(f"run folder: {run_dir}")
    return "\n".join(lines)
