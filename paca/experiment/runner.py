"""Run one experiment on one backend and leave a complete run folder behind.

The same experiment file gives the same run on every backend: the backend only decides
where the model computes. A run can be resumed from its last checkpoint, and Ctrl-C (or
any error) still leaves a usable folder whose ``summary.json`` says how it ended.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paca import distributed
from paca.experiment import record
from paca.experiment.callbacks import InputCounter, RunRecorder, truncate_metrics
from paca.experiment.data import build_dataset, load_splits
from paca.experiment.methods import Prepared, prepare
from paca.experiment.model_loader import load_model
from paca.experiment.schema import Experiment, ExperimentError, loads_experiment
from paca.experiment.trainer import build_trainer, common_arguments, trainer_kind

logger = logging.getLogger("paca.experiment")

_PRECISION_CAPABILITY = {"bf16": "bfloat16", "fp16": "float16"}


class RunFolderExistsError(FileExistsError):
    """The run folder already holds a run and ``resume`` was not asked for."""


class RunCompletedError(ExperimentError):
    """``resume`` was asked for a run that already completed: there is nothing to continue."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def _select_backend(name: str | None) -> Any:
    import paca

    if name and name != "auto":
        paca.use_backend(name)  # unknown/unavailable: the registry says why
    return paca.get_backend()


def default_run_dir(exp: Experiment, backend_name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", exp.name).strip("-") or "experiment"
    return Path(exp.output_dir) / f"{safe}-{backend_name}-{stamp}"


def _accuracy_fns(task: str) -> tuple[Any, Any]:
    """``(preprocess_logits_for_metrics, compute_metrics)`` giving ``eval_accuracy``."""

    def to_predictions(logits: Any, labels: Any) -> Any:
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def accuracy(eval_pred: Any) -> dict[str, float]:
        preds, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
        if task == "causal-lm":  # position t predicts token t + 1
            preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != -100
        if not mask.any():
            return {}
        return {"accuracy": float((preds[mask] == labels[mask]).mean())}

    return to_predictions, accuracy


def _last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return float(values[-1]) if values else None


class _Run:
    """State of one run while it executes (kept small: the steps are in :meth:`execute`)."""

    def __init__(
        self,
        exp: Experiment,
        backend: Any,
        run_dir: Path,
        progress: bool,
        parallel: dict[str, Any] | None = None,
    ) -> None:
        self.exp, self.backend, self.run_dir, self.progress = exp, backend, run_dir, progress
        self.parallel = parallel or record.parallelism(None)
        self.summary: dict[str, Any] = {}
        self.trainer: Any = None
        self.recorder: RunRecorder | None = None
        self.prepared: Prepared | None = None

    def write_summary(self, **updates: Any) -> None:
        self.summary.update(updates)
        if self.recorder is not None:
            self.summary.update(self.recorder.throughput())
        if self.trainer is not None:
            history = self.trainer.state.log_history
            self.summary["steps"] = self.trainer.state.global_step
            self.summary["train_loss_final"] = _last_logged(history, "loss")
        record.write_json(self.run_dir / record.SUMMARY_FILE, self.summary)

    def setup(self) -> tuple[Any, Any]:
        exp, b = self.exp, self.backend
        capability = _PRECISION_CAPABILITY.get(exp.train.precision)
        if capability and capability not in b.capabilities:
            raise ExperimentError(
                f"[train].precision = {exp.train.precision!r} needs capability {capability!r}, "
                f"which backend {b.name!r} does not declare ({sorted(b.capabilities)})"
            )
        from transformers import set_seed

        set_seed(exp.seed)
        splits = load_splits(exp.data, exp.seed)
        loaded = load_model(exp.model, exp.seed, splits.num_labels)
        train_ds = build_dataset(splits.train, loaded, exp.data)
        eval_ds = build_dataset(splits.eval, loaded, exp.data) if splits.eval else None
        self.prepared = prepare(loaded.model, exp.method, exp.seed, b)
        p = self.prepared
        self.summary.update(
            task=loaded.task,
            model_source=loaded.source,
            train_examples=len(train_ds),
            eval_examples=len(eval_ds) if eval_ds is not None else 0,
            trainable_params=p.trainable,
            total_params=p.total,
            trainable_percent=100 * p.trainable / max(p.total, 1),
            effective_learning_rate=exp.train.lr * p.lr_scale,
        )
        counter = InputCounter(p.model)
        self.recorder = RunRecorder(
            record.metrics_path(self.run_dir),  # rank 0's; os.devnull on the other ranks
            b,
            counter,
            exp.train.throughput_warmup_steps,
            log_rows=not self.progress,
        )
        kind = trainer_kind(b.device_type)
        args = common_arguments(exp, self.run_dir / record.CHECKPOINTS, b.device_type, p.lr_scale)
        args["disable_tqdm"] = not self.progress
        args.update(parallel_arguments(exp, self.parallel, b))
        to_predictions, accuracy = _accuracy_fns(loaded.task)
        from transformers import default_data_collator

        self.trainer = build_trainer(
            exp, kind, p.model, args, b,
            train_dataset=train_ds, eval_dataset=eval_ds, data_collator=default_data_collator,
            compute_metrics=accuracy, preprocess_logits_for_metrics=to_predictions,
            callbacks=[self.recorder],
        )  # fmt: skip
        from transformers.trainer_callback import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # logs go to the logger, not stdout
        self.summary["trainer"] = "GaudiTrainer" if kind == "gaudi" else "Trainer"
        return train_ds, eval_ds

    def execute(self, resume: bool) -> dict[str, Any]:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint_dir = self.run_dir / record.CHECKPOINTS
        last = None
        if resume and checkpoint_dir.is_dir():
            last = get_last_checkpoint(str(checkpoint_dir))
        if resume and last is None:
            logger.warning(
                "no checkpoint in %s: starting the run from the beginning", checkpoint_dir
            )
        previous = self.summary.copy()
        _, eval_ds = self.setup()
        trainer, p = self.trainer, self.prepared
        assert trainer is not None and p is not None
        if last is not None:
            step = int(Path(last).name.rsplit("-", 1)[-1])
            if distributed.is_writer():  # rank 0 owns the run folder
                truncate_metrics(self.run_dir / record.METRICS_FILE, step)
            self.summary["resumed_from"] = str(Path(last).relative_to(self.run_dir))
            for key in ("eval_loss_before", "eval_accuracy_before"):
                if key in previous:
                    self.summary[key] = previous[key]
        else:
            record.write_text(self.run_dir / record.METRICS_FILE, "")  # rank 0 only
            if eval_ds is not None:
                before = trainer.evaluate()
                self.summary["eval_loss_before"] = before.get("eval_loss")
                self.summary["eval_accuracy_before"] = before.get("eval_accuracy")
                logger.info(
                    "eval loss before training: %.4f", before.get("eval_loss", float("nan"))
                )
        self.write_summary(status="running")

        started = time.perf_counter()
        if p.trains:
            output = trainer.train(resume_from_checkpoint=last)
            self.summary["train_loss_mean"] = float(output.training_loss)
        self.summary["train_seconds"] = time.perf_counter() - started
        if eval_ds is not None:
            after = trainer.evaluate()
            self.summary["eval_loss"] = after.get("eval_loss")
            self.summary["eval_accuracy"] = after.get("eval_accuracy")
        saved = p.save(self.run_dir)
        self.summary["adapter"] = str(saved.relative_to(self.run_dir)) if saved else None
        self.write_summary(status="completed", finished=_now())
        return self.summary

    def save_partial(self, status: str, error: str | None = None) -> None:
        """After Ctrl-C or an error: save what was learned so far and mark the summary."""
        if self.prepared is not None and self.trainer is not None and self.prepared.trains:
            try:
                saved = self.prepared.save(self.run_dir)
                self.summary["adapter"] = str(saved.relative_to(self.run_dir)) if saved else None
            except Exception as exc:  # keep the original failure the one reported
                logger.warning("could not save the partial adapter: %s", exc)
        self.write_summary(status=status, error=error, finished=_now())


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _initial_summary(exp: Experiment, backend: Any, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "running",
        "name": exp.name,
        "method": exp.method.name,
        "model": exp.model.name,
        "backend": backend.name,
        "device": env["device_name"],
        "precision": exp.train.precision,
        "seq_len": exp.data.seq_len,
        "batch_size": exp.train.batch_size,
        "grad_accum": exp.train.grad_accum,
        "seed": exp.seed,
    }


def _stored_experiment(folder: Path) -> Experiment:
    exp_file = folder / record.EXPERIMENT_FILE
    if not exp_file.is_file():
        raise FileNotFoundError(f"cannot resume: {exp_file} not found (is {folder} a run folder?)")
    return loads_experiment(exp_file.read_text(encoding="utf-8"), source=str(exp_file))


def parallel_arguments(exp: Experiment, parallel: dict[str, Any], backend: Any) -> dict:
    """Trainer arguments for ``parallel`` (:func:`record.parallelism`): the per-rank batch,
    and the FSDP2 or DeepSpeed settings of its strategy.

    ``[train].batch_size`` is the global batch of one forward/backward: each of the
    ``world_size`` ranks takes ``batch_size / world_size`` of it, so one experiment file
    trains the same way (the same losses, within float tolerance) at any world size.
    """
    t, world, strategy = exp.train, parallel["world_size"], parallel["strategy"]
    how = "([train].batch_size is the global batch; each rank takes batch_size / world size)"
    per_rank = distributed.check_divisible(t.batch_size, world, "[train].batch_size", how)
    eval_batch = t.eval_batch_size or t.batch_size
    out: dict[str, Any] = {
        "per_device_train_batch_size": per_rank,
        "per_device_eval_batch_size": max(1, -(-eval_batch // world)),
    }
    if strategy == "fsdp2":
        if backend.device_type == "cpu":
            raise ExperimentError(
                "--strategy fsdp2 goes through the Trainer's FSDP2 integration (accelerate), "
                "which accelerate enables on accelerators only: on CPU ranks it would silently "
                "train with DDP instead. Use --strategy ddp on CPU, or FSDP2 in your own "
                "training loop with paca.distributed.fully_shard_layers (docs/distributed.md)"
            )
        out["fsdp"] = "full_shard auto_wrap"
        out["fsdp_config"] = {
            "fsdp_version": 2,
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        }
    elif strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ImportError(
                "--strategy deepspeed needs DeepSpeed: pip install 'paca[deepspeed]' (on Gaudi, "
                "Intel's fork for your software release; docs/distributed.md)"
            ) from None
        if not (distributed.under_torchrun() or distributed.is_distributed()):
            raise ExperimentError(
                "--strategy deepspeed needs a launcher (DeepSpeed reads the ranks from its "
                "environment): add --nproc N (N >= 1; paca starts torchrun) or start paca run "
                "with torchrun (docs/distributed.md)"
            )
        if not t.deepspeed:
            out["deepspeed"] = distributed.deepspeed_config(2, gaudi=backend.device_type == "hpu")
    return out


def run_experiment(
    exp: Experiment | None,
    backend: str | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    strategy: str | None = None,
) -> RunResult:
    """Train ``exp`` on ``backend`` (default: ``exp.backend``) and write its run folder.

    Under torchrun (``paca run --nproc N``) every rank calls this; rank 0 writes the run
    folder, and ``strategy`` (``ddp``, the default, ``fsdp2`` or ``deepspeed``) says how
    the ranks share the model (docs/distributed.md). The summary and environment record
    ``world_size`` and ``strategy``.

    ``resume``: continue the run in ``run_dir`` from its last checkpoint, with the
    experiment stored there (``exp`` may be None; if given it must be the same) and,
    unless ``backend`` is given, the backend it ran on. ``KeyboardInterrupt`` and errors
    are re-raised after the summary is marked ``interrupted`` / ``failed``.
    """
    previous: dict[str, Any] = {}
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run folder to continue (run_dir)")
        stored = _stored_experiment(Path(run_dir))
        if exp is not None and exp.to_dict() != stored.to_dict():
            raise ExperimentError(
                f"cannot resume {run_dir} with a different experiment; its own is in "
                f"{Path(run_dir) / record.EXPERIMENT_FILE}"
            )
        exp = stored
        summary_file = Path(run_dir) / record.SUMMARY_FILE
        if summary_file.is_file():
            try:
                previous = record.read_json(summary_file)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ExperimentError(
                    f"cannot resume {run_dir}: {summary_file} is not valid JSON ({exc}); "
                    f"restore it, or delete it to resume from the last checkpoint anyway"
                ) from None
            if not isinstance(previous, dict):
                raise ExperimentError(
                    f"cannot resume {run_dir}: {summary_file} holds {type(previous).__name__}, "
                    f"not a run summary; restore it, or delete it to resume anyway"
                )
        if previous.get("status") == "completed":
            # Resuming would train past the end from the last checkpoint and overwrite the
            # finished adapter: refuse, and say how to train longer without losing it.
            raise RunCompletedError(
                f"cannot resume {run_dir}: that run already completed "
                f"({previous.get('steps', '?')} steps; its adapter is kept as it is). To train "
                f"longer, start a new run from its experiment, e.g. paca run "
                f"{Path(run_dir) / record.EXPERIMENT_FILE} --set train.steps=N --run-dir NEW_DIR"
            )
        backend = backend or previous.get("backend")
        if strategy is None and previous.get("strategy") not in (None, "single"):
            strategy = previous["strategy"]
    if exp is None:
        raise ValueError("run_experiment needs an experiment (or resume=True and run_dir)")
    b = _select_backend(backend or exp.backend)
    if strategy is not None and strategy not in distributed.STRATEGIES:
        raise ExperimentError(
            f"unknown strategy {strategy!r}; use one of {', '.join(distributed.STRATEGIES)}"
        )
    parallel = record.parallelism(strategy)
    parallel_arguments(exp, parallel, b)  # a bad world size or strategy fails here, early
    folder = Path(run_dir) if run_dir is not None else default_run_dir(exp, b.name)
    summary_path = folder / record.SUMMARY_FILE
    if not resume and summary_path.is_file():
        raise RunFolderExistsError(
            f"run folder {folder} already holds a run; pass --resume to continue it or "
            f"choose another --run-dir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    env = {**record.environment(b), **parallel}
    record.write_text(folder / record.EXPERIMENT_FILE, exp.to_toml())
    record.write_json(folder / record.ENVIRONMENT_FILE, env)
    logger.info("run folder: %s (backend %s on %s)", folder, b.name, env["device_name"])

    run = _Run(exp, b, folder, progress, parallel)
    run.summary = {**previous, **_initial_summary(exp, b, env), **parallel}
    run.summary.pop("error", None)
    try:
        summary = run.execute(resume)
    except KeyboardInterrupt:
        logger.warning("interrupted: the run folder %s holds the partial run", folder)
        run.save_partial("interrupted")
        raise
    except BaseException as exc:
        run.save_partial("failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if run.recorder is not None:
            run.recorder.counter.remove()
    return RunResult(folder, summary)
