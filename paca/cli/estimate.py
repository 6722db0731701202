"""``paca estimate MODEL``: will a fine-tuning run fit? Peak memory without allocating.

Runs :func:`paca.estimate.estimate_memory` (a dry run on the meta device) for one or
more methods and prints a table with each method's predicted peak and whether it fits
the devices given with ``--device-gib`` (default 80 and 96 GiB: an A100/H100 80GB and
an Intel Gaudi2). ``--json`` prints the full estimates instead.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from paca.cli.common import UsageError

DEFAULT_DEVICES = (80.0, 96.0)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict peak training memory of PaCA/QPaCA/LoRA/QLoRA/full without allocating",
        description=(
            "Predict the peak memory of one training step from a transformers model config "
            "by running the step on the meta device (no memory is allocated). MODEL is a "
            "known name (llama-3-8b, llama-3.1-70b, llama-2-7b, bench-default, bench-quick, "
            "bench-tiny), a config.json path or folder, or a hub id (only its config is read)."
        ),
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument(
        "--method",
        default="paca,qpaca,lora,qlora,full",
        help="comma list of paca, qpaca, lora, qlora, full (default: all)",
    )
    p.add_argument("--r", type=int, default=8, help="PaCA columns / LoRA rank (default 8)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="transformers' activation checkpointing (non-reentrant)",
    )
    p.add_argument("--targets", default=None, help="comma list of target module names")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="which device's defaults apply (optimizer implementation); default cuda",
    )
    p.add_argument(
        "--device-gib",
        default=",".join(f"{g:g}" for g in DEFAULT_DEVICES),
        help="comma list of device memory sizes in GiB to check against (default 80,96)",
    )
    p.add_argument("--no-double-quant", action="store_true", help="4-bit scales not quantized")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=run)


def _devices(text: str) -> list[float]:
    try:
        sizes = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--device-gib {text!r}: give numbers in GiB, e.g. 80,96") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise UsageError(f"--device-gib {text!r}: give positive sizes in GiB, e.g. 80,96")
    return sizes


def run(args: argparse.Namespace) -> int:
    from paca.estimate import GIB, METHODS, estimate_memory

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"--method {args.method!r}: choose from {', '.join(METHODS)}")
    devices = _devices(args.device_gib)
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    estimates = [
        estimate_memory(
            args.model,
            m,
            r=args.r,
            batch=args.batch,
            seq=args.seq,
            dtype=args.dtype,
            gradient_checkpointing=args.gradient_checkpointing,
            targets=targets,
            double_quant=not args.no_double_quant,
            device=args.device,
        )
        for m in methods
    ]
    if args.json:
        print(json.dumps([e.to_dict() for e in estimates], indent=2))
        return 0
    first = estimates[0]
    ckpt = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(
        f"{first.model} ({first.total_params / 1e6:,.1f} M parameters): r={args.r}, batch "
        f"{args.batch} × seq {args.seq}, {args.dtype}{ckpt}, AdamW, {args.device} defaults"
    )
    small = max(e.peak_bytes for e in estimates) < GIB
    unit, scale = ("MiB", 1024**2) if small else ("GiB", GIB)
    head = ["method", "trainable", "weights", "optimizer", "activations", "peak", "needs"]
    head += [f"{g:g} GiB" for g in devices]
    rows = []
    for e in estimates:
        need = e.required_bytes()
        rows.append(
            [
                e.method,
                f"{e.trainable_params / 1e6:,.2f} M",
                f"{(e.weight_bytes + e.quant_state_bytes) / scale:.2f}",
                f"{e.optimizer_state_bytes / scale:.2f}",
                f"{e.saved_activation_bytes / scale:.2f}",
                f"{e.peak_bytes / scale:.2f}",
                f"{need / scale:.2f}",
                *("fits" if need <= g * GIB else "no" for g in devices),
            ]
        )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print(
        f"{unit}; 'needs' = peak + 5% + 1 GiB (allocator and runtime headroom); weights include "
        "4-bit scales; see docs/benchmarks.md for the validation"
    )
    return 0
