"""How the PaCA op applies its r trained columns: the candidates, measured side by side.

For one layer step (forward + backward) of a PaCA ``nn.Linear``, compare:

* ``frozen``: the same layer with everything frozen (the physical bound);
* ``materialize``: API v1's way, a full effective-weight copy in forward and in backward;
* ``swap``: write ``round(W[:, idx] + delta)`` into W for the GEMM, restore it exactly;
* ``decompose``: ``x·Wᵀ + x_sel·deltaᵀ`` and ``dY·W`` plus ``dY·delta`` into the r columns
  (W never written);
* ``auto``: per call, whichever of swap/decompose writes fewer bytes (the default).

Reports bytes written beyond frozen (deterministic, from ``paca.testing.traffic``) and
step time relative to frozen, median and spread over paired rounds (every candidate
once per round, in rotating order, so machine load hits all alike).

    python benchmarks/seam_strategies.py [--rounds 30] [--tokens 256 2048] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from paca_cpu import CPUBackend
from torch import nn

import paca
from paca.testing.traffic import WriteCounter


class Materialize(CPUBackend):
    """API v1's op: a new effective weight per call (two weight copies per step)."""

    name = "materialize"
    priority = None

    def _w_eff(self, weight, idx, delta):
        cols = weight.index_select(1, idx).float() + delta.float()
        return weight.index_copy(1, idx, cols.to(weight.dtype))

    def linear_forward(self, x, weight, bias, delta, idx):
        return self.linear(x, self._w_eff(weight, idx, delta), bias), self.gather(x, idx)

    def linear_backward(self, grad_out, x_sel, weight, delta, idx, need_x, need_d):
        gx = self.input_grad(grad_out, self._w_eff(weight, idx, delta)) if need_x else None
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        gd = self.delta_grad(flat, x_sel.reshape(-1, x_sel.shape[-1]), delta.dtype)
        return gx, gd if need_d else None


def _strategy(name: str) -> CPUBackend:
    return type(name, (CPUBackend,), {"name": name, "priority": None, "column_strategy": name})()


def _candidates(
    in_f: int, out_f: int, tokens: int, r: int, dtype: torch.dtype
) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype).requires_grad_(False)
    x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, out_f, dtype=dtype)

    def step_of(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            module(x).backward(g)

        return step

    steps = {"frozen": step_of(base)}
    backends = {
        "materialize": Materialize(),
        "swap": _strategy("swap"),
        "decompose": _strategy("decompose"),
        "auto": CPUBackend(),
    }
    for name, backend in backends.items():
        model = paca.wrap(
            nn.Sequential(copy.deepcopy(base)),
            paca.PacaConfig(r=r, target_modules=["0"], delta_dtype=None),
            backend=backend,
            move_to_device=False,
        )
        with torch.no_grad():
            model.model[0].paca_delta["default"].normal_(0, 0.01)
        steps[name] = step_of(model)
    return steps, base.weight.numel() * base.weight.element_size()


def measure(in_f: int, out_f: int, tokens: int, r: int, dtype: torch.dtype, rounds: int) -> list:
    steps, w_bytes = _candidates(in_f, out_f, tokens, r, dtype)
    written = {}
    for name, step in steps.items():
        step()  # warm-up
        with WriteCounter() as c:
            step()
        written[name] = c.bytes
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in names:
        ratios = [t / f for t, f in zip(times[name], times["frozen"], strict=True)]
        q = statistics.quantiles(ratios, n=4)
        rows.append(
            {
                "candidate": name,
                "extra_written_over_weight": (written[name] - written["frozen"]) / w_bytes,
                "time_over_frozen_median": statistics.median(ratios),
                "time_over_frozen_iqr": (q[0], q[2]),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--in-features", type=int, default=1024)
    ap.add_argument("--out-features", type=int, default=2816)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 on a loaded machine: OpenMP barriers of small ops otherwise "
        "wait for a time slice, which times the load, not the op)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"nn.Linear {args.in_features}->{args.out_features}, r={args.r}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, {args.rounds} paired rounds"
    )
    print(
        "| tokens | candidate | extra bytes written / weight bytes | step time / frozen (median, IQR) |"
    )
    print("|---:|---|---:|---|")
    for tokens in args.tokens:
        for row in measure(args.in_features, args.out_features, tokens, args.r, dtype, args.rounds):
            lo, hi = row["time_over_frozen_iqr"]
            print(
                f"| {tokens} | {row['candidate']} | {row['extra_written_over_weight']:.3f} | "
                f"{row['time_over_frozen_median']:.3f} ({lo:.3f}–{hi:.3f}) |"
            )


if __name__ == "__main__":
    main()
