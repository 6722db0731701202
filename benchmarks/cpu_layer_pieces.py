"""Where a PaCA layer's extra step time goes on CPU (fp32): each piece of the op, timed.

    python benchmarks/cpu_layer_pieces.py [ROUNDS] [OUT_JSON]

For the three adapted-layer shapes of ``paca bench``'s default config (1024→1024: q, k,
v, o; 1024→2816: gate, up; 2816→1024: down) at its 1024 tokens, r=8: the frozen layer's
forward+backward (dX), the PaCA layer's, and the pieces PaCA adds (gather, the forward
column swap, the d(delta) GEMM as the CPU backend computes it and in the transposed
form, the backward decomposition's dY·delta GEMM and its index_add_ into dX). Rounds
interleave every case in rotating order; median and min per case, and the paired
per-round PaCA/frozen ratio. A diagnostic for docs/benchmarks.md, not part of the suite.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from paca_cpu import CPUBackend
from torch import nn

import paca

N, R = 1024, 8


def cases(in_f: int, out_f: int) -> dict[str, Callable[[], Any]]:
    b = CPUBackend()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).requires_grad_(False)
    pm = paca.wrap(model, paca.PacaConfig(r=R, target_modules=["0"]), backend="cpu")
    layer = next(iter(pm.paca_layers()))[1]
    base, w = layer.base_layer, layer.base_layer.weight
    delta, idx = layer.paca_delta["default"], layer.paca_idx["default"]
    with torch.no_grad():
        delta.normal_(0, 1e-3)
    x = torch.randn(2, N // 2, in_f, requires_grad=True)
    g = torch.randn(2, N // 2, out_f)
    flat_g = g.reshape(-1, out_f)
    xs = x.detach().reshape(-1, in_f).index_select(1, idx)
    d = delta.detach()
    dx = torch.empty(N, in_f)

    def step(mod: nn.Module) -> None:
        x.grad = None
        delta.grad = None
        mod(x).backward(g)

    def swap() -> None:
        with b.columns_applied(w, idx, d):
            pass

    return {
        "frozen layer fwd+bwd": lambda: step(base),
        "PaCA layer fwd+bwd": lambda: step(layer),
        "gather x[..., idx]": lambda: b.gather(x.detach(), idx),
        "column swap (apply+restore)": swap,
        "d(delta): g.t().mm(x_sel) [CPU backend]": lambda: flat_g.t().mm(xs),
        "d(delta): x_sel.t().mm(g).t() [alternative]": lambda: xs.t().mm(flat_g).t().contiguous(),
        "dX correction g.mm(delta)": lambda: flat_g.matmul(d),
        "dX index_add_ of the correction": lambda: dx.index_add_(1, idx, xs),
    }


def measure(in_f: int, out_f: int, rounds: int) -> dict[str, Any]:
    fns = cases(in_f, out_f)
    for f in fns.values():
        f()
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for rnd in range(rounds):
        for k in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    pr = [
        a / c
        for a, c in zip(samples["PaCA layer fwd+bwd"], samples["frozen layer fwd+bwd"], strict=True)
    ]
    q = statistics.quantiles(pr, n=4)
    out: dict[str, Any] = {
        k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)}
        for k, v in samples.items()
    }
    out["paired_paca_over_frozen"] = {"median": statistics.median(pr), "q1": q[0], "q3": q[2]}
    return out


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 25
    result = {}
    for in_f, out_f in ((1024, 1024), (1024, 2816), (2816, 1024)):
        key = f"{in_f}->{out_f}"
        result[key] = res = measure(in_f, out_f, rounds)
        p = res["paired_paca_over_frozen"]
        print(
            f"== {key}: PaCA/frozen per-round median {p['median']:.3f} ({p['q1']:.3f}-{p['q3']:.3f})"
        )
        for k, v in res.items():
            if "median_ms" in v:
                print(f"   {k:46s} median {v['median_ms']:8.2f} ms  min {v['min_ms']:8.2f} ms")
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
