"""Which change would bring PaCA to the frozen bound on CPU? Whole steps, paired rounds.

    python benchmarks/cpu_step_variants.py ROUNDS OUT_JSON [VARIANT ...]

The default ``paca bench`` config (fp32), one training step per method per round in
rotating order: the frozen bound, PaCA on the CPU backend as it is, and PaCA on CPU
backend subclasses defined here (nothing in paca is changed):

* ``swap``: ``column_strategy = "swap"`` (the columns are swapped in backward too,
  instead of the decomposition's dY·delta GEMM and index_add_);
* ``fastdd``: ``d(delta)`` computed as ``(x_selᵀ·dY)ᵀ`` instead of ``dYᵀ·x_sel``;
* ``swap+fastdd``: both.

Variants default to all three. The gradients of each variant are first compared with
the CPU backend's (max relative difference printed). A diagnostic for
docs/benchmarks.md, not part of the suite.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from typing import Any

import torch
from paca_cpu import CPUBackend

from paca.bench.config import preset
from paca.bench.methods import (
    MethodSetup,
    apply_method,
    build_base,
    inputs_require_grad,
    make_batch,
    make_optimizer,
    train_step,
)


class FastDD(CPUBackend):
    name = "cpu-fastdd"
    priority = None

    def delta_grad(
        self, grad_out: torch.Tensor, x_sel: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        if out_dtype == grad_out.dtype:
            return x_sel.t().mm(grad_out).t().contiguous()
        return x_sel.float().t().mm(grad_out.float()).t().to(out_dtype).contiguous()


class Swap(CPUBackend):
    name = "cpu-swap"
    priority = None
    column_strategy = "swap"


class SwapFastDD(FastDD):
    name = "cpu-swap-fastdd"
    column_strategy = "swap"


VARIANTS = {"swap": Swap, "fastdd": FastDD, "swap+fastdd": SwapFastDD}


def main() -> None:
    rounds, out_path = int(sys.argv[1]), sys.argv[2]
    chosen = sys.argv[3:] or list(VARIANTS)
    cfg = preset("default")
    ids = make_batch(cfg, cfg.seq, torch.device("cpu"))

    def setup(name: str, method: str, backend: CPUBackend) -> MethodSetup:
        model = apply_method(
            method, build_base(cfg), r=cfg.r, targets=cfg.targets, backend=backend, seed=cfg.seed
        )
        if method == "frozen":
            inputs_require_grad(model)
        return MethodSetup(name, model, make_optimizer(model, cfg.lr), 0, 0, {})

    setups = {"frozen": setup("frozen", "frozen", CPUBackend())}
    setups["paca"] = setup("paca", "paca", CPUBackend())
    for v in chosen:
        setups[f"paca {v}"] = setup(f"paca {v}", "paca", VARIANTS[v]())
    grads: dict[str, list[torch.Tensor]] = {}
    for name, s in setups.items():
        if name == "frozen":
            continue
        s.model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = [p.grad.clone() for p in s.model.parameters() if p.requires_grad]
        s.optimizer.zero_grad(set_to_none=True)
    for name, gs in grads.items():
        diff = max(
            (a - b).abs().max().item() / (b.abs().max().item() or 1.0)
            for a, b in zip(gs, grads["paca"], strict=True)
        )
        print(f"{name}: max relative gradient difference vs the CPU backend {diff:.2e}")
    for s in setups.values():
        train_step(s, ids)
    times: dict[str, list[float]] = {n: [] for n in setups}
    names = list(setups)
    for k in range(rounds):
        gc.collect()
        for n in names[k % len(names) :] + names[: k % len(names)]:
            gc.disable()
            t0 = time.perf_counter()
            train_step(setups[n], ids)
            times[n].append(time.perf_counter() - t0)
            gc.enable()
    result: dict[str, Any] = {}
    for n in names:
        pr = [a / b for a, b in zip(times[n], times["frozen"], strict=True)]
        q = statistics.quantiles(pr, n=4)
        result[n] = {
            "median_s": statistics.median(times[n]),
            "min_s": min(times[n]),
            "vs_frozen_median": statistics.median(pr),
            "q1": q[0],
            "q3": q[2],
            "per_round": pr,
        }
        print(
            f"{n:20s} median {statistics.median(times[n]):6.2f} s  min {min(times[n]):6.2f} s  "
            f"per-round vs frozen: median {statistics.median(pr):.3f} ({q[0]:.3f}-{q[2]:.3f})"
        )
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
