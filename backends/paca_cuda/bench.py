"""A short CUDA benchmark: PaCA's paths against a frozen layer and LoRA, plus kernel A/Bs.

    python -m paca_cuda.bench            # on a GPU: bf16, 4096-wide layers, ~1 minute
    python -m paca_cuda.bench --tiny     # a smoke run on any device (CPU in the tests)

What it times (median of CUDA-event timings after warm-up; no logging inside the loop):

* one training step (forward + backward) through a stack of linear layers with
  a frozen layer (the floor), LoRA (r, two extra GEMMs per layer), PaCA with the per-call
  effective weight (torch kernels and Triton kernels), PaCA with the per-step weight cache;
  with peak memory and saved-activation bytes per method;
* the three primitives the backend accelerates, each torch path vs its fused path.

Figures are printed as a table and, with ``--json PATH``, written for run records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import paca
from paca import weight_cache


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    """A function timing ``fn`` (median ms over ``iters`` after ``warmup`` calls)."""

    def run(fn: Callable[[], Any], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


class _LoRALinear(nn.Module):
    """Minimal LoRA (frozen W plus trainable B @ A), the baseline the paper compares to."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def _stack(width: int, depth: int, dtype: torch.dtype, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    return nn.Sequential(*layers).to(device=device, dtype=dtype).requires_grad_(False)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in owned:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def bench_steps(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from paca_cuda import CUDABackend
    from paca_cuda.kernels import triton_installed

    dtype = getattr(torch, args.dtype)
    timer = _timer(device)
    x = torch.randn(args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)
    rows: list[dict[str, Any]] = []

    def record(name: str, model: nn.Module, cache: bool = False) -> None:
        def step() -> None:
            x.grad = None
            model(x).float().square().mean().backward()

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timer(step, args.warmup, args.iters)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rows.append(
            {
                "method": name,
                "ms": ms,
                "peak_bytes": peak,
                "saved_bytes": _saved_bytes(model, x),
                "cache_bytes": weight_cache.cached_bytes() if cache else 0,
            }
        )

    record("frozen (no adapter)", _stack(args.width, args.depth, dtype, device))
    lora = _stack(args.width, args.depth, dtype, device)
    for i, layer in enumerate(list(lora)):
        lora[i] = _LoRALinear(layer, args.r).to(device)
    record(f"LoRA r={args.r}", lora)

    modes = ["torch"] + (["triton"] if triton_installed() and device.type == "cuda" else [])
    config = paca.PacaConfig(r=args.r, target_modules=[str(i) for i in range(args.depth)])
    for mode in modes:
        backend = CUDABackend(kernels=mode)
        model = paca.wrap(
            _stack(args.width, args.depth, dtype, device),
            config,
            backend=backend,
            move_to_device=False,
        )
        record(f"PaCA per-call ({mode})", model)
    backend = CUDABackend(kernels=modes[-1], cache_effective_weight=True)
    model = paca.wrap(
        _stack(args.width, args.depth, dtype, device), config, backend=backend, move_to_device=False
    )
    record(f"PaCA step-cache ({modes[-1]})", model, cache=True)
    weight_cache.clear()
    return rows


def bench_primitives(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from paca_cpu import CPUBackend

    from paca_cuda import CUDABackend
    from paca_cuda.kernels import can_run_on, triton_installed

    dtype = getattr(torch, args.dtype)
    timer = _timer(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.width, generator=gen).to(device, dtype)
    w = torch.randn(args.width, args.width, generator=gen).to(device, dtype)
    idx = torch.randperm(args.width, generator=gen)[: args.r].to(device)
    delta = torch.zeros(args.width, args.r, device=device)
    g = torch.randn(args.tokens, args.width, generator=gen).to(device, dtype)
    xs = x[:, idx].contiguous()
    ref, plain = CPUBackend(), CUDABackend(kernels="torch")
    fused = CUDABackend(kernels="triton") if triton_installed() and can_run_on(x) else None
    rows = []
    cases = [
        ("gather x[..., idx]", lambda b: b.gather(x, idx)),
        ("effective weight", lambda b: b.effective_weight(w, idx, delta)),
        ("delta grad (fp32 acc)", lambda b: b.delta_grad(g, xs)),
    ]
    for name, fn in cases:
        row: dict[str, Any] = {
            "primitive": name,
            "reference_ms": timer(lambda f=fn: f(ref), 2, args.iters),
        }
        row["cuda_torch_ms"] = timer(lambda f=fn: f(plain), 2, args.iters)
        if fused is not None:
            row["cuda_triton_ms"] = timer(lambda f=fn: f(fused), 2, args.iters)
        rows.append(row)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and v >= 2**20:
        return f"{v / 2**20:.1f}MiB"
    if isinstance(v, int) and v >= 2**10:
        return f"{v / 2**10:.1f}KiB"
    return str(v)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m paca_cuda.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096, help="batch x sequence length")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run on any device")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.depth, args.tokens, args.r, args.warmup, args.iters = 64, 2, 32, 4, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.dtype != "float32" and not args.tiny:
        print("no GPU: use --tiny for a smoke run on CPU")
    from paca_cuda import CUDABackend

    result = {
        "device": CUDABackend().describe() if device.type == "cuda" else {"device_type": "cpu"},
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "steps": bench_steps(args, device),
        "primitives": bench_primitives(args, device),
    }
    lora = next(r["ms"] for r in result["steps"] if r["method"].startswith("LoRA"))
    for r in result["steps"]:
        r["vs_lora"] = r["ms"] / lora
    print(f"# paca CUDA bench on {result['device']}")
    print(f"# {result['config']}")
    _print_table(result["steps"])
    print()
    _print_table(result["primitives"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
