"""Entry point of the ``paca`` command.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``
(which registers the subcommand and sets ``func``); list it in
:data:`SUBCOMMANDS` to make it appear.

Errors never show a Python traceback unless asked for (``--debug`` or
``PACA_DEBUG=1``): :func:`main` is the one place that turns an exception into a
one- or two-line message on stderr. Exit status: 0 success; 1 an error (a user
mistake, or a failure the message describes); 2 a command-line usage error
(argparse); 130 interrupted (Ctrl-C). A closed stdout (``paca backends | head``)
ends the command quietly with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from paca.environment import env_flag

SUBCOMMANDS = [
    "paca.cli.run",
    "paca.cli.backends",
    "paca.cli.bench",
    "paca.cli.compare",
    "paca.cli.estimate",
]

#: Set to 1 to see the full traceback of an error (same as ``paca --debug``).
DEBUG_ENV = "PACA_DEBUG"

#: Exception types whose message is written for the user as it stands (paca's own
#: errors derive from these). Anything else is shown with its type name and a hint.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ExperimentError, UnknownBackendError, AdapterMismatchError, ...
    TypeError,
    LookupError,
    OSError,  # FileNotFoundError, FileExistsError (RunFolderExistsError), PermissionError
    RuntimeError,  # BackendUnavailableError, BackendBuildError, ...
    ImportError,  # a missing optional dependency, with its install hint
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paca",
        description="PaCA fine-tuning on CPU, NVIDIA GPUs, Intel Gaudi and plugin backends.",
        epilog=f"Errors are one or two lines; --debug or {DEBUG_ENV}=1 shows the traceback.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the Python traceback of an error (same as {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` among the arguments, or ``PACA_DEBUG`` set to a true value."""
    flag = env_flag(DEBUG_ENV)
    args = sys.argv[1:] if argv is None else argv
    return flag or "--debug" in args


def format_error(command: str | None, exc: BaseException) -> str:
    """The message :func:`main` prints for ``exc`` (one line, two for unexpected errors)."""
    prefix = f"paca {command}: error: " if command else "paca: error: "
    if isinstance(exc, OSError) and exc.strerror and exc.filename and len(exc.args) >= 2:
        text = f"{exc.strerror}: {exc.filename}"  # "[Errno 2] ..." is not for people
        if exc.filename2:
            text += f" -> {exc.filename2}"
    elif isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__:
        text = f"{type(exc).__name__}: {exc.args[0]!r}" if exc.args else type(exc).__name__
    else:
        text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, EXPECTED_ERRORS):
        return (
            f"{prefix}{type(exc).__name__}: {text}\n"
            f"  (unexpected; rerun with --debug or {DEBUG_ENV}=1 for the traceback, and please "
            f"report it if it is paca's fault)"
        )
    return prefix + text


def _quiet_broken_pipe() -> None:
    """stdout's reader went away: point stdout at /dev/null so the exit flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file descriptor (tests)
        pass


def main(argv: list[str] | None = None) -> int:
    debug = debug_requested(argv)
    command: str | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        debug = debug or args.debug
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe is reported here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"paca{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 0
    except SystemExit:  # argparse usage errors and --help
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_broken_pipe()
        raise
    except Exception as exc:
        if debug:
            raise
        with contextlib.suppress(BrokenPipeError):
            print(format_error(command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
