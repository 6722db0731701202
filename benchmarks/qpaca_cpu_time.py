"""CPU time per training step of QPaCA, QLoRA, PaCA and LoRA on a ``paca bench`` preset.

    python benchmarks/qpaca_cpu_time.py quick 12     # preset, rounds

One torch thread, methods interleaved in rotating order, ``time.process_time`` per step:
on a shared machine the process's CPU time is far less disturbed by other work than wall
time (OpenMP threads spin while waiting for a core). Prints JSON; docs/benchmarks.md
quotes it.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from paca.bench.config import preset
from paca.bench.methods import build_method, make_batch, train_step
from paca.bench.runner import resolve_backend

METHODS = ("qpaca", "qlora", "paca", "lora")


def main(name: str = "quick", rounds: int = 10) -> dict[str, object]:
    torch.set_num_threads(1)
    cfg = preset(name)
    backend = resolve_backend("cpu")
    setups = [build_method(m, cfg, backend) for m in METHODS]
    ids = make_batch(cfg, cfg.seq, backend.device())
    for setup in setups:
        for _ in range(2):
            train_step(setup, ids)
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        gc.collect()
        for setup in setups[r % len(setups) :] + setups[: r % len(setups)]:
            gc.disable()
            c0, w0 = time.process_time(), time.perf_counter()
            train_step(setup, ids)
            cpu[setup.name].append(time.process_time() - c0)
            wall[setup.name].append(time.perf_counter() - w0)
            gc.enable()
    out: dict[str, object] = {"preset": name, "rounds": rounds, "threads": 1}
    for m in METHODS:
        out[m] = {
            "cpu_median_s": statistics.median(cpu[m]),
            "cpu_min_s": min(cpu[m]),
            "wall_median_s": statistics.median(wall[m]),
        }
    for a, b in (("qpaca", "qlora"), ("paca", "lora"), ("qpaca", "paca")):
        pairs = [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]
        out[f"{a}/{b}_cpu_paired_median"] = statistics.median(pairs)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    result = main(args[0] if args else "quick", int(args[1]) if len(args) > 1 else 10)
    print(json.dumps(result, indent=1))
