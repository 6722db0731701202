"""Validate `paca estimate` against measured peaks, and predict the paper's models.

    python benchmarks/estimate_check.py validate    # bench presets tiny, quick, default
    python benchmarks/estimate_check.py predict     # LLaMA-3-8B and LLaMA-3.1-70B (bf16)

Writes benchmarks/results/estimate/{validation,predictions}.json (used by docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from paca.estimate import GIB, estimate_memory, validate

OUT = Path(__file__).resolve().parent / "results" / "estimate"


def run_validation() -> None:
    rows = []
    for preset in ("tiny", "quick", "default"):
        for ckpt in (False, True):
            for row in validate(preset, gradient_checkpointing=ckpt):
                rows.append(row)
                print(
                    f"{preset:8} ckpt={ckpt!s:5} {row['method']:6} measured "
                    f"{row['measured_peak_bytes'] / 2**20:9.2f} MiB  estimated "
                    f"{row['estimated_peak_bytes'] / 2**20:9.2f} MiB  {100 * row['error']:+.2f}%",
                    flush=True,
                )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "validation.json").write_text(json.dumps(rows, indent=1))


def run_predictions() -> None:
    runs = [("llama-3-8b", m, 1, False) for m in ("paca", "lora", "full", "qpaca", "qlora")]
    runs += [("llama-3-8b", m, 8, False) for m in ("paca", "lora", "qpaca", "qlora")]
    runs += [("llama-3.1-70b", m, 1, c) for m in ("qpaca", "qlora") for c in (True, False)]
    runs += [("llama-3.1-70b", m, 1, True) for m in ("paca", "lora")]
    out = []
    for model, method, batch, ckpt in runs:
        start = time.time()
        e = estimate_memory(
            model, method, r=8, batch=batch, seq=512, dtype="bfloat16", gradient_checkpointing=ckpt
        )
        row = {**e.to_dict(), "seconds": time.time() - start}
        out.append(row)
        print(
            f"{model:14} {method:6} batch {batch} ckpt={ckpt!s:5} peak "
            f"{e.peak_bytes / GIB:7.2f} GiB, needs {e.required_bytes() / GIB:7.2f} GiB",
            flush=True,
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "predictions.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "validate"
    run_validation() if what == "validate" else run_predictions()
