"""``paca backends``: every discovered backend, who provides it, whether it can run here,
which one is selected and why, and every plugin problem (duplicates, load errors, blocks,
ties, backends that fail to construct, entry points named unlike their backend).

``--check [NAME]`` runs the conformance suite (:mod:`paca.testing`) on a backend instead.

Exit status: 0, or 1 when the backend that would be selected cannot be used (an unknown
``PACA_BACKEND``, an unavailable ``--backend``, one whose constructor raises, nothing to
auto-detect) or, with ``--check``, when NAME is unknown or unavailable here (one line
saying why) or a contract item fails, so scripts can check a machine with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "backends",
        help="list discovered backends, their providers, and which one is selected and why",
        description=(
            "List every discovered backend: who provides it, whether it can run here, which "
            "one is selected and why, and plugin problems (duplicates, load errors, blocks). "
            "Exit status 1 when the backend that would be selected cannot be used, or with "
            "--check when a contract item fails."
        ),
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--backend",
        metavar="NAME",
        help="show the selection as if NAME were chosen explicitly (checks that it can run)",
    )
    p.add_argument(
        "--check",
        nargs="?",
        const="",
        metavar="NAME",
        help="run the conformance suite (paca.testing) on NAME (default: the selected backend) "
        "and print which contract items pass or fail",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="with --check: skip the torch.compile item"
    )
    p.set_defaults(func=run)


@dataclass
class Listing:
    """Everything ``paca backends`` reports, gathered once from the registry."""

    backends: list[Any]
    selected: str | None
    why: str
    problem: str | None  # why the selected backend cannot be used, if it cannot
    duplicates: list[str] = field(default_factory=list)
    plugin_errors: list[dict[str, str]] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    autoload_disabled: bool = False
    #: Auto-detection: the candidates that failed to construct, and the ties it resolved.
    skipped: list[str] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    #: Backends provided under an entry point of another name (not loadable lazily).
    entry_point_mismatches: list[str] = field(default_factory=list)


def gather(explicit: str | None = None) -> Listing:
    """Ask the registry for everything (plugin warnings are collected, not printed twice)."""
    from paca._registry import BackendBuildError, UnknownBackendError, registry
    from paca.backend_abc import BackendUnavailableError

    reg = registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each problem is listed below instead
        infos = reg.infos()
        errors = reg.plugin_errors()
        blocked = reg.blocked()
        by_name = {i.name: i for i in infos}
        problem = None
        if explicit is not None:
            selected, why = explicit, "explicit (--backend)"
        else:
            try:  # auto-detection constructs its pick; one that fails is skipped
                selected, why = reg.selection()
            except Exception as exc:  # nothing available at all is still worth listing
                selected, why, problem = None, "none", str(exc)
        auto = reg.last_auto_selection()  # None unless auto-detection ran
        if selected is not None and problem is None:
            info = by_name.get(selected)
            if info is None:
                problem = f"no installed plugin provides a backend named {selected!r}"
            elif not info.available:
                problem = f"{selected!r} is not available here: {info.reason}"
            else:
                try:
                    reg.instance(selected)
                except (UnknownBackendError, BackendUnavailableError, BackendBuildError) as exc:
                    problem = str(exc)
    duplicates = [
        f"backend {i.name!r} is provided by {i.distribution} {i.version} (used) and by {dup} "
        f"(ignored)"
        for i in infos
        for dup in i.duplicates
    ]
    mismatches = [
        f"backend {i.name!r} from {i.distribution} {i.version} is provided under the entry "
        f"point {i.entry_point!r}; name the entry point {i.name!r} so paca can load it by name"
        for i in infos
        if not i.entry_point_matches
    ]
    return Listing(
        backends=infos,
        selected=selected,
        why=why,
        problem=problem,
        duplicates=duplicates,
        plugin_errors=[
            {
                "plugin": r.name,
                "distribution": r.distribution,
                "version": r.version,
                "error": r.error or "",
            }
            for r in errors
        ],
        blocked=blocked,
        autoload_disabled=reg.autoload_disabled(),
        skipped=list(auto.skipped) if auto is not None else [],
        ties=list(auto.ties) if auto is not None else [],
        entry_point_mismatches=mismatches,
    )


def _api(info: Any) -> str:
    from paca._registry import format_api_version

    return format_api_version(info.api_version)


def as_json(listing: Listing) -> dict[str, Any]:
    from paca._registry import AUTO_RULE

    return {
        "selected": listing.selected,
        "why": listing.why,
        "problem": listing.problem,
        "auto_rule": AUTO_RULE,
        "backends": [
            {
                "name": i.name,
                "distribution": i.distribution,
                "version": i.version,
                "plugin": i.plugin,
                "entry_point": i.entry_point,
                "builtin": i.builtin,
                "api_version": list(i.api_version) if i.api_version else None,
                "available": i.available,
                "reason": i.reason,
                "priority": i.priority,
                "auto_selectable": i.auto_selectable,
                "auto_note": i.auto_note,
                "device_type": i.device_type,
                "capabilities": sorted(i.capabilities),
                "selected": i.name == listing.selected,
                "duplicates": list(i.duplicates),
            }
            for i in listing.backends
        ],
        "skipped": listing.skipped,
        "ties": listing.ties,
        "duplicates": listing.duplicates,
        "entry_point_mismatches": listing.entry_point_mismatches,
        "plugin_errors": listing.plugin_errors,
        "blocked": listing.blocked,
        "autoload_disabled": listing.autoload_disabled,
    }


def as_text(listing: Listing) -> str:
    rows = [("", "NAME", "PROVIDED BY", "DEVICE", "PRIORITY", "API", "AVAILABLE", "CAPABILITIES")]
    for i in listing.backends:
        rows.append(
            (
                "*" if i.name == listing.selected else "",
                i.name,
                f"{i.distribution} {i.version}".strip(),
                i.device_type or "?",
                "-" if i.priority is None else str(i.priority),
                _api(i),
                "yes" if i.available else "no",
                ",".join(sorted(i.capabilities)),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    # Reasons are sentences with install hints: below the table, not squeezed into it.
    lines += [f"{i.name}: not available: {i.reason}" for i in listing.backends if not i.available]
    lines += [
        f"{i.name}: never auto-selected: {i.auto_note}"
        for i in listing.backends
        if i.available and not i.auto_selectable and i.priority is not None
    ]
    if not listing.backends:
        lines.append("(no backends found; is paca installed correctly?)")
    lines.append("")
    lines.append(f"selected: {listing.selected or 'none'} ({listing.why})")
    if listing.problem:
        lines.append(f"  cannot be used: {listing.problem}")
    lines += [f"skipped: {s}" for s in listing.skipped]
    lines += [f"tie: {t}" for t in listing.ties]
    lines += [f"duplicate: {d}" for d in listing.duplicates]
    lines += [f"entry point: {m}" for m in listing.entry_point_mismatches]
    lines += [
        f"plugin error: plugin {e['plugin']!r} from distribution {e['distribution']} "
        f"{e['version']}: {e['error']}"
        for e in listing.plugin_errors
    ]
    lines += [f"blocked: {b}" for b in listing.blocked]
    if listing.autoload_disabled:
        lines.append(
            "note: PACA_DISABLE_PLUGIN_AUTOLOAD is set; only backends built into paca are listed"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    check = getattr(args, "check", None)
    if check is not None:
        return run_check(check, args)
    listing = gather(getattr(args, "backend", None))
    print(json.dumps(as_json(listing), indent=2) if args.json else as_text(listing))
    return 1 if listing.problem else 0


def _check_target(name: str) -> tuple[str | None, str | None]:
    """``(backend name, None)`` to check, or ``(None, why it cannot be checked here)``."""
    from paca._registry import registry

    reg = registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not name:
            try:
                name = reg.selection()[0]
            except Exception as exc:
                return None, f"no backend is selected ({exc}); name one: --check NAME"
        info = next((i for i in reg.infos() if i.name == name), None)
        if info is None:
            available = ", ".join(reg.available_names()) or "none"
            return None, (
                f"unknown paca backend {name!r} (available here: {available}; "
                f"`paca backends` lists every backend)"
            )
    if not info.available:
        return None, f"backend {name!r} is not available here: {info.reason}"
    return name, None


def run_check(name: str | None, args: argparse.Namespace) -> int:
    """``--check``: the conformance report for one backend; exit 1 if any item failed, or
    (with one line on stderr) if the backend is unknown or cannot run on this machine."""
    target, why = _check_target(name or "")
    if target is None:
        print(f"paca backends --check: {why}", file=sys.stderr)
        return 1
    from paca.testing import check_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_backend(target, run_compile=not getattr(args, "no_compile", False))
    if args.json:
        print(
            json.dumps(
                {
                    "backend": report.backend,
                    "device": report.device,
                    "ok": report.ok,
                    "results": [vars(r) for r in report.results],
                },
                indent=2,
            )
        )
    else:
        print(report.summary())
    return 0 if report.ok else 1
