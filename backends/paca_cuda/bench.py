"""A short CUDA benchmark: PaCA against a frozen layer and LoRA, plus the fused-op pieces.

    python -m paca_cuda.bench            # on a GPU: bf16, 4096-wide layers, ~1 minute
    python -m paca_cuda.bench --tiny     # a smoke run on any device (CPU in the tests)

What it measures (median of CUDA-event timings after warm-up; no logging inside the loop):

* one training step (forward + backward) through a stack of linear layers, the methods
  built by :func:`paca.bench.methods.apply_method` (the builder ``paca bench`` uses): the
  frozen stack (the floor), PEFT LoRA (same r), and PaCA with each kernel mode (torch,
  and Triton where it can run) and, for the last mode, each column strategy forced
  (``swap``: the r columns written into W for the GEMM and restored; ``decompose``:
  ``x·Wᵀ + x_sel·deltaᵀ``, W never written); per method the peak memory, the saved
  activations (:class:`paca.bench.memory.SavedActivationCounter`) and the bytes the
  step writes beyond the frozen stack's (:class:`paca.testing.traffic.WriteCounter`);
* the pieces of the fused op, each on the reference (CPU backend's torch code on the
  same tensors), the CUDA backend with torch kernels and with Triton kernels: the
  gather, the column swap (apply + exact restore), ``linear_forward``,
  ``linear_backward`` and ``delta_grad``, next to the frozen layer's two GEMMs.

Bytes written are counted at the aten dispatcher: a Triton kernel launched directly is
invisible to it, so Triton rows under-count (``traffic_complete`` says which rows are
exact). Figures are printed as tables and, with ``--json PATH``, written for run records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paca.bench.memory import model_tensors, saved_activation_bytes
from paca.bench.methods import apply_method
from paca.testing.traffic import WriteCounter


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


def _stack(width: int, depth: int, dtype: torch.dtype, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    return nn.Sequential(*layers).to(device=device, dtype=dtype).requires_grad_(False)


def _peft_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def bench_steps(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from paca_cuda import CUDABackend
    from paca_cuda.kernels import triton_installed

    dtype = getattr(torch, args.dtype)
    timer = _timer(device)
    x = torch.randn(args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)
    targets = [str(i) for i in range(args.depth)]
    weight_bytes = (
        args.depth * args.width * args.width * torch.empty((), dtype=dtype).element_size()
    )
    rows: list[dict[str, Any]] = []

    def build(method: str, backend: CUDABackend) -> nn.Module:
        model = _stack(args.width, args.depth, dtype, device)
        return apply_method(
            method, model, r=args.r, targets=targets, backend=backend, move_to_device=False
        )

    def record(name: str, model: nn.Module, triton: bool = False) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad]

        def step() -> None:
            x.grad = None
            for p in trainable:
                p.grad = None
            model(x).float().square().mean().backward()

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timer(step, args.warmup, args.iters)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        _, saved = saved_activation_bytes(lambda: model(x), model_tensors(model))
        with WriteCounter() as written:
            step()
        rows.append(
            {
                "method": name,
                "ms": ms,
                "peak_bytes": peak,
                "saved_bytes": saved.total_bytes,
                "bytes_written": written.bytes,
                "traffic_complete": not triton,
            }
        )

    torch_backend = CUDABackend(kernels="torch")
    record("frozen (no adapter)", build("frozen", torch_backend))
    if _peft_installed():
        record(f"LoRA r={args.r}", build("lora", torch_backend))
    else:
        print("peft is not installed (pip install peft): the LoRA row is left out")

    modes = ["torch"] + (["triton"] if triton_installed() and device.type == "cuda" else [])
    for mode in modes:
        record(f"PaCA ({mode})", build("paca", CUDABackend(kernels=mode)), triton=mode == "triton")
    for strategy in ("swap", "decompose"):
        backend = CUDABackend(kernels=modes[-1])
        backend.column_strategy = strategy  # per instance: the class default stays "auto"
        record(
            f"PaCA {strategy} ({modes[-1]})",
            build("paca", backend),
            triton=modes[-1] == "triton",
        )
    frozen = rows[0]["bytes_written"]
    for r in rows:
        r["extra_bytes_written"] = r["bytes_written"] - frozen
        r["extra_vs_weights"] = r["extra_bytes_written"] / weight_bytes
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
    delta = (torch.randn(args.width, args.r, generator=gen) * 1e-3).to(device)  # fp32 master
    g = torch.randn(args.tokens, args.width, generator=gen).to(device, dtype)
    xs = x[:, idx].contiguous()
    backends: dict[str, Any] = {
        "reference": CPUBackend(),
        "cuda_torch": CUDABackend(kernels="torch"),
    }
    if triton_installed() and can_run_on(x):
        backends["cuda_triton"] = CUDABackend(kernels="triton")

    def swap(b: Any) -> None:
        with b.columns_applied(w, idx, delta):
            pass

    cases: list[tuple[str, Callable[[Any], Any]]] = [
        ("frozen GEMM x·Wᵀ", lambda b: F.linear(x, w)),
        ("frozen GEMM dY·W", lambda b: g.matmul(w)),
        ("gather x[..., idx]", lambda b: b.gather(x, idx)),
        ("column swap (apply + restore)", swap),
        ("linear_forward", lambda b: b.linear_forward(x, w, None, delta, idx)),
        ("linear_backward", lambda b: b.linear_backward(g, xs, w, delta, idx, True, True)),
        ("delta_grad (fp32 acc)", lambda b: b.delta_grad(g, xs, torch.float32)),
    ]
    rows = []
    with torch.no_grad():
        before = w.clone()
        for name, fn in cases:
            row: dict[str, Any] = {"piece": name}
            for key, b in backends.items():
                row[f"{key}_ms"] = timer(lambda f=fn, b=b: f(b), 2, args.iters)
            with WriteCounter() as written:
                fn(backends["cuda_torch"])
            row["bytes_written_torch"] = written.bytes
            rows.append(row)
        if not torch.equal(w, before):
            raise AssertionError("a backend left the weight changed after the column swap")
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
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and abs(v) >= 2**20:
        return f"{v / 2**20:.1f}MiB"
    if isinstance(v, int) and abs(v) >= 2**10:
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
    lora = next((r["ms"] for r in result["steps"] if r["method"].startswith("LoRA")), None)
    frozen = result["steps"][0]["ms"]
    for r in result["steps"]:
        r["vs_frozen"] = r["ms"] / frozen
        r["vs_lora"] = r["ms"] / lora if lora else None
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
