"""Checks of command-line paths shared by the subcommands (errors a user can act on)."""

from __future__ import annotations

from pathlib import Path


class UsageError(ValueError):
    """A command-line argument cannot work as given; the message says what to give instead."""


def output_folder(path: str | Path, flag: str = "--out", what: str = "the outputs") -> Path:
    """``path`` as a folder to write into (created later if missing); refuse a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(
            f"{flag} {p} is a file, not a folder; give a folder for {what} (it is created if "
            f"missing)"
        )
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {p}: {parent} is a file, so no folder can be made there")
            break
    return p


def input_file(path: str | Path, flag: str, what: str) -> Path:
    """``path`` as an existing file to read; a missing path or a folder is refused."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p}: no such file (expected {what})")
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; give {what}")
    return p
