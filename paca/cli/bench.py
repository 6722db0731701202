"""``paca bench``: PaCA vs PEFT LoRA vs full fine-tuning vs the frozen-base bound."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from paca.cli.common import UsageError, input_file, output_folder

GIB = 1024**3


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark PaCA against LoRA, full fine-tuning and the frozen base",
        description=(
            "Measure step time (interleaved rounds, paired per-round ratios), saved "
            "activations, peak memory, optimizer state, bytes written per step, throughput "
            "and the max sequence length under a memory budget for each method, in one "
            "process. Writes bench.json, bench.md and bench.png."
        ),
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="small model (about a minute)")
    preset.add_argument("--preset", default=None, help="default, quick or tiny (default: default)")
    p.add_argument("--backend", default=None, help="cpu, cuda, hpu, a plugin's name, or auto")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of paca,lora,full,frozen (default) and qpaca,qlora (4-bit NF4 base)",
    )
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--r", type=int, default=None, help="PaCA columns / LoRA rank")
    p.add_argument("--targets", default=None, help="comma list of target layer names")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (one step of each method each)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--budget-gib", type=float, default=None, help="memory budget for max seq (default 8)"
    )
    p.add_argument("--seq-points", default=None, help="comma list of probe lengths (CPU fit)")
    p.add_argument(
        "--no-traffic",
        action="store_true",
        help="skip counting the bytes each method's step writes (one untimed step each)",
    )
    p.add_argument(
        "--from-json",
        default=None,
        metavar="BENCH_JSON",
        help="re-render a saved bench.json (recompute ratios, fits, tables, chart) into --out",
    )
    p.add_argument("--no-chart", action="store_true", help="skip bench.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in (
        "hidden", "layers", "heads", "kv_heads", "intermediate", "seq", "batch", "r",
        "dtype", "seed", "warmup", "repeats", "threads", "backend",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    if args.methods:
        out["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.targets:
        out["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.no_traffic:
        out["traffic"] = False
    if args.budget_gib is not None:
        out["budget_bytes"] = int(args.budget_gib * GIB)
    if args.seq_points:
        try:
            out["seq_points"] = tuple(int(x) for x in args.seq_points.split(",") if x.strip())
        except ValueError:
            raise UsageError(
                f"--seq-points {args.seq_points!r}: give a comma list of whole numbers, "
                f"e.g. 128,256,512"
            ) from None
    return out


def run(args: argparse.Namespace) -> int:
    output_folder(args.out, "--out", "bench.json, bench.md and bench.png")  # before, not after
    if args.from_json:
        input_file(args.from_json, "--from-json", "a bench.json written by paca bench")
    overrides = _overrides(args)
    from paca.bench import preset, run_benchmark, total_units, write_outputs

    if args.from_json:
        return _rerender(args)
    import importlib.util

    from paca.bench.report import NO_MATPLOTLIB

    if not args.no_chart and importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError(NO_MATPLOTLIB)  # say so now, not after the whole run
    name = "quick" if args.quick else (args.preset or "default")
    config = preset(name, **overrides)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total_units(config), desc="paca bench", unit="step", file=sys.stderr)

    def progress(label: str, units: int) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(units)

    try:
        result = run_benchmark(config, progress)
    finally:
        if bar is not None:
            bar.close()
    paths = write_outputs(result, args.out, chart=not args.no_chart)
    print((paths[1]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _rerender(args: argparse.Namespace) -> int:
    import datetime
    import json

    from paca.bench import SCHEMA, write_outputs
    from paca.bench.runner import derive

    path = input_file(args.from_json, "--from-json", "a bench.json written by paca bench")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from-json {path} is not valid JSON: {exc}") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        found = result.get("schema") if isinstance(result, dict) else type(result).__name__
        raise UsageError(f"--from-json {path} is not a {SCHEMA} result (schema {found!r})")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result.setdefault("rerendered_utc", []).append(stamp)  # the raw samples are unchanged
    paths = write_outputs(derive(result, refit=True), args.out, chart=not args.no_chart)
    print(paths[1].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
