"""``paca compare RUN_DIR...``: side-by-side table (terminal + Markdown) and a PNG plot."""

from __future__ import annotations

import argparse
from typing import Any

from paca.cli.common import output_folder


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="compare run folders: throughput, step time, memory, loss (ratios to the first)",
        description="Print a side-by-side table of run folders written by 'paca run' and "
        "write compare.md and compare.png into --out.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders; the first is the baseline"
    )
    p.add_argument("--out", default=".", help="folder for compare.md and compare.png (default: .)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paca.experiment.compare import compare, format_table

    output_folder(args.out, "--out", "compare.md and compare.png")
    result = compare(args.runs, out_dir=args.out, png=not args.no_plot)
    print(format_table(result["rows"], markdown=True) if args.markdown else result["table"])
    print(f"wrote {result['markdown']}")
    if "png" in result:
        print(f"wrote {result['png']}")
    return 0
