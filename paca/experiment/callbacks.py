"""Trainer callbacks that measure a run honestly and stream its metrics to disk.

Step times are taken between ``on_step_begin`` and ``on_step_end`` with the backend
synchronized at both ends, so they cover forward, backward and the optimizer step but
not data loading, logging, evaluation or checkpointing. Tokens and samples are counted
by a forward pre-hook on the model while it trains (eval forwards are not counted).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger("paca.experiment")
_SHOWN = ("loss", "eval_loss", "eval_accuracy", "learning_rate", "grad_norm")


class InputCounter:
    """Counts the tokens and samples of training forwards (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.tokens = 0
        self.padded_tokens = 0
        self.samples = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        pixels = kwargs.get("pixel_values")
        if ids is not None:
            self.samples += int(ids.shape[0])
            self.padded_tokens += int(ids.numel())
            self.tokens += int(mask.sum()) if mask is not None else int(ids.numel())
        elif pixels is not None:
            self.samples += int(pixels.shape[0])

    def remove(self) -> None:
        self._handle.remove()


class RunRecorder(TrainerCallback):
    """Times steps, tracks peak device memory, and appends every log to ``metrics.jsonl``."""

    def __init__(
        self,
        metrics_path: Path,
        backend: Any,
        counter: InputCounter,
        warmup_steps: int,
        log_rows: bool = False,
    ) -> None:
        self.metrics_path = metrics_path
        self.log_rows = log_rows  # also log each row (when no progress bar shows them)
        self.backend = backend
        self.counter = counter
        self.warmup_steps = warmup_steps
        self.step_seconds: list[float] = []  # measured steps, after warm-up
        self.steps_done = 0
        self.tokens = 0
        self.padded_tokens = 0
        self.samples = 0
        self._t0 = 0.0
        self._counts0 = (0, 0, 0)
        self._start = time.time()
        self.peak_memory: int | None = None  # training peak, taken when training ends

    def _counts(self) -> tuple[int, int, int]:
        c = self.counter
        return c.tokens, c.padded_tokens, c.samples

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.backend.reset_peak_memory()
        self.peak_memory = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.peak_memory = self.backend.max_memory_allocated()  # before the final eval

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.backend.synchronize()
        self._counts0 = self._counts()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.backend.synchronize()
        seconds = time.perf_counter() - self._t0
        self.steps_done += 1
        if self.steps_done > self.warmup_steps:
            tokens, padded, samples = self._counts()
            self.step_seconds.append(seconds)
            self.tokens += tokens - self._counts0[0]
            self.padded_tokens += padded - self._counts0[1]
            self.samples += samples - self._counts0[2]

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time": time.time() - self._start}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.log_rows:
            shown = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in logs.items()
                if k in _SHOWN
            )
            logger.info("step %d: %s", state.global_step, shown)

    def throughput(self) -> dict[str, Any]:
        """Tokens/s, samples/s and the median step time over the measured steps."""
        total = sum(self.step_seconds)
        return {
            "measured_steps": len(self.step_seconds),
            "throughput_warmup_steps": self.warmup_steps,
            "tokens_per_second": self.tokens / total if total and self.tokens else None,
            "padded_tokens_per_second": (
                self.padded_tokens / total if total and self.padded_tokens else None
            ),
            "samples_per_second": self.samples / total if total else None,
            "step_time_median_s": statistics.median(self.step_seconds)
            if self.step_seconds
            else None,
            "peak_memory_bytes": (
                self.peak_memory
                if self.peak_memory is not None
                else self.backend.max_memory_allocated()
            ),
        }


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (they are redone when a run resumes)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= after_step]
    path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")
