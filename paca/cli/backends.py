"""``paca backends``: list discovered backends, their providers and availability."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("backends", help="list discovered backends and which one is selected")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from paca._registry import registry

    reg = registry()
    infos = reg.infos()
    try:
        selected, why = reg.selection()
    except Exception as exc:  # no backend at all is still worth listing
        selected, why = None, f"none: {exc}"
    errors = reg.plugin_errors()
    if args.json:
        print(
            json.dumps(
                {
                    "selected": selected,
                    "why": why,
                    "backends": [
                        {
                            "name": i.name,
                            "distribution": i.distribution,
                            "version": i.version,
                            "available": i.available,
                            "reason": i.reason,
                            "priority": i.priority,
                            "capabilities": sorted(i.capabilities),
                            "duplicates": list(i.duplicates),
                        }
                        for i in infos
                    ],
                    "plugin_errors": [
                        {"plugin": r.name, "distribution": r.distribution, "error": r.error}
                        for r in errors
                    ],
                },
                indent=2,
            )
        )
        return 0
    rows = [("", "NAME", "PROVIDED BY", "AVAILABLE", "PRIORITY", "CAPABILITIES")]
    for i in infos:
        rows.append(
            (
                "*" if i.name == selected else "",
                i.name,
                f"{i.distribution} {i.version}".strip(),
                "yes" if i.available else f"no: {i.reason}",
                "-" if i.priority is None else str(i.priority),
                ",".join(sorted(i.capabilities)),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    print(f"\nselected: {selected or 'none'} ({why})")
    for i in infos:
        for dup in i.duplicates:
            print(f"warning: backend {i.name!r} is also provided by {dup} (ignored)")
    for r in errors:
        print(f"warning: {r.label} failed to load: {r.error}")
    return 0
