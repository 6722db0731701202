"""Backend discovery and selection.

Discovery is lazy and cached: entry points of the group ``paca.backends`` are
*listed* cheaply from installed metadata, and a plugin module is imported only
when its backend is asked for by name, when auto-detection needs to ask it
whether it is available, or when the user lists backends. A plugin that fails
to import, raises from its hook (anything, even ``SystemExit`` or
``KeyboardInterrupt``), declares an incompatible API version or collides with
another plugin's backend name is reported by its distribution name and left
out; every other backend keeps working.

Users keep plugins out with ``PACA_BLOCKED_BACKENDS`` (comma-separated backend,
entry-point or distribution names; or :func:`paca.block_backend`) and
``PACA_DISABLE_PLUGIN_AUTOLOAD=1`` (only backends built into paca are listed).

Selection order: an explicit :func:`use_backend` / ``with paca.backend(...)``,
then the ``PACA_BACKEND`` environment variable, then auto-detection.

Auto-detection (:meth:`Registry.auto_selection`) considers only available backends
with an ``int`` priority and tries them from the highest priority down, taking the
first one that constructs:

* the built-ins (distribution ``paca``: hpu 300, cuda 200, cpu 0) take part with
  their priority;
* a third-party backend takes part only when its *own* class body declares
  ``priority`` (one inherited, e.g. from the CPU reference, never counts) and that
  priority is strictly above every available built-in's: **built-ins win ties**;
* two or more third-party backends with the same priority are **not** picked
  between: none of them is auto-selected (a warning and ``paca backends`` say so,
  and how to choose one);
* a backend whose constructor raises is skipped with a warning naming its plugin and
  distribution, and the next one is tried.

A ``KeyboardInterrupt`` raised by plugin code (its import, hook, ``is_available`` or
constructor) counts as a plugin failure; a real Ctrl-C (SIGINT arriving while that
code runs in the main thread) still interrupts the program.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata as importlib_metadata
import inspect
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from paca import hookspecs
from paca.backend_abc import BACKEND_API_VERSION, Backend, BackendUnavailableError
from paca.backend_abc import api_version_tuple as parse_api_version  # one parser for both
from paca.environment import env_flag

logger = logging.getLogger("paca.registry")

BACKEND_ENV = "PACA_BACKEND"
DISABLE_AUTOLOAD_ENV = "PACA_DISABLE_PLUGIN_AUTOLOAD"
BLOCKED_ENV = "PACA_BLOCKED_BACKENDS"
#: Distribution whose entry points are "built-in" (kept when autoload is off).
BUILTIN_DISTRIBUTION = "paca"
#: The backend auto-detection falls back to when nothing better is available.
DEFAULT_BACKEND = "cpu"

#: The auto-detection rule, as ``paca backends`` and the docs state it.
AUTO_RULE = (
    "highest priority among available backends that construct; built-ins win ties; a "
    "third-party backend counts only with a priority declared in its own class and above "
    "the available built-ins'; third-party backends of equal priority are not auto-selected"
)


class UnknownBackendError(KeyError, ValueError):
    """No installed plugin provides a backend of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BackendBuildError(RuntimeError):
    """A backend is available but constructing it raised (a bug in its plugin)."""


class PluginLoadWarning(UserWarning):
    """A backend plugin could not be loaded; the others are unaffected."""


class SelectionWarning(PluginLoadWarning):
    """Auto-detection skipped a backend (it failed to construct, or tied with another)."""


class EntryPointNameWarning(PluginLoadWarning):
    """A plugin provides a backend under an entry point of another name (no lazy loading)."""


# --------------------------------------------------------------------------- API versions


def format_api_version(version: tuple[int, int] | None) -> str:
    return "?" if version is None else f"{version[0]}.{version[1]}"


def api_incompatibility(value: Any, distribution: str = "the plugin") -> str | None:
    """Why a backend declaring ``api_version = value`` cannot load here, or ``None``.

    Accepted: an int ``N`` (meaning ``(N, 0)``) or a ``(major, minor)`` tuple with this
    paca's major and a minor no newer than this paca's (minor versions only add members
    with defaults). The reason says what to do.
    """
    ours = parse_api_version(BACKEND_API_VERSION) or (0, 0)
    theirs = parse_api_version(value)
    here = format_api_version(ours)
    if theirs is None:
        return (
            f"declares api_version = {value!r}, which is neither an int nor a (major, minor) "
            f"tuple of ints; {distribution} should set api_version = {ours!r} "
            f"(paca.backend_abc.BACKEND_API_VERSION)"
        )
    there = format_api_version(theirs)
    if theirs[0] < ours[0]:
        return (
            f"was written for paca backend API v{there}, but this paca speaks v{here} (a new "
            f"major version: members changed); install a version of {distribution} made for "
            f"API v{ours[0]} (pip install -U {distribution}), or a paca for API v{theirs[0]}"
        )
    if theirs[0] > ours[0]:
        return (
            f"was written for paca backend API v{there}, newer than this paca's v{here}; "
            f"upgrade paca (pip install -U paca), or install a version of {distribution} "
            f"made for API v{ours[0]}"
        )
    if theirs[1] > ours[1]:
        return (
            f"was written for paca backend API v{there}, newer than this paca's v{here} (it "
            f"may use members this paca lacks); upgrade paca (pip install -U paca), or "
            f"install a version of {distribution} made for API v{here}"
        )
    return None


# ------------------------------------------------------------------ running plugin code
class _PluginFault(Exception):
    """Plugin code raised; ``exc`` is what it raised (possibly a BaseException)."""

    def __init__(self, exc: BaseException) -> None:
        text = str(exc)
        super().__init__(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
        self.exc = exc


_sigint_count = 0


def _counting_sigint_handler(signum: int, frame: Any) -> None:
    global _sigint_count
    _sigint_count += 1
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint_watch() -> Iterator[Callable[[], bool]]:
    """Yield a function telling whether a real SIGINT (Ctrl-C) arrived meanwhile.

    Only possible in the main thread with Python's default SIGINT handler in place (it
    is swapped for a counting one that behaves the same, and put back after). Elsewhere
    a ``KeyboardInterrupt`` cannot come from a signal, or cannot be told apart.
    """
    start = _sigint_count
    restore = None
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, _counting_sigint_handler)
                restore = signal.default_int_handler
    try:
        yield lambda: _sigint_count != start
    finally:
        if restore is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                if signal.getsignal(signal.SIGINT) is _counting_sigint_handler:
                    signal.signal(signal.SIGINT, restore)


def _call_plugin(fn: Callable[..., Any], *args: Any) -> Any:
    """Run plugin code; whatever it raises becomes a :class:`_PluginFault` to report.

    ``SystemExit`` and a ``KeyboardInterrupt`` raised by the plugin itself included; a
    real Ctrl-C while it runs propagates as ``KeyboardInterrupt``.
    """
    with _sigint_watch() as interrupted:
        try:
            return fn(*args)
        except KeyboardInterrupt as exc:
            if interrupted():
                raise
            raise _PluginFault(exc) from exc
        except (Exception, SystemExit) as exc:
            raise _PluginFault(exc) from exc


# ----------------------------------------------------------------------------- records
@dataclass
class PluginRecord:
    """One entry point of the ``paca.backends`` group and what loading it gave."""

    name: str
    value: str
    distribution: str
    version: str
    loaded: bool = False
    error: str | None = None
    #: Skipped on purpose (``PACA_BLOCKED_BACKENDS`` / :func:`paca.block_backend`).
    blocked: bool = False
    backends: list[str] = field(default_factory=list)
    #: False for classes given to :func:`paca.register_backend` (no entry point).
    from_entry_point: bool = True

    @property
    def label(self) -> str:
        return f"plugin {self.name!r} from distribution {self.distribution} {self.version}".rstrip()

    @property
    def builtin(self) -> bool:
        return self.from_entry_point and _canonical(self.distribution) == BUILTIN_DISTRIBUTION


@dataclass(frozen=True)
class BackendInfo:
    """What the registry knows about one backend (a row of ``paca backends``)."""

    name: str
    distribution: str
    version: str
    plugin: str
    available: bool
    reason: str | None
    priority: int | None
    device_type: str | None
    capabilities: frozenset[str]
    cls: type[Backend] | None = field(default=None, repr=False, compare=False)
    duplicates: tuple[str, ...] = ()
    #: The backend API version the class declares, as ``(major, minor)`` (None: invalid).
    api_version: tuple[int, int] | None = None
    #: Name of the entry point that provides it (None: registered at run time). Lazy
    #: loading by name needs it to equal :attr:`name`.
    entry_point: str | None = None
    #: Provided by paca itself (cpu, cuda, hpu).
    builtin: bool = False
    #: Whether auto-detection may consider it at all (see :attr:`auto_note` if not).
    auto_selectable: bool = False
    #: Why auto-detection never picks it, when it never does.
    auto_note: str | None = None

    @property
    def entry_point_matches(self) -> bool:
        """Whether the backend can be loaded lazily by name (entry point named like it)."""
        return self.entry_point is None or self.entry_point == self.name


@dataclass
class AutoSelection:
    """What auto-detection decided, and what it passed over on the way."""

    name: str | None
    #: Candidates in the order they were tried.
    order: list[str] = field(default_factory=list)
    #: One sentence per candidate that failed to construct.
    skipped: list[str] = field(default_factory=list)
    #: One sentence per tie (and how it was resolved).
    ties: list[str] = field(default_factory=list)
    #: Why nothing could be selected (when ``name`` is None).
    error: str | None = None


@dataclass
class _Entry:
    cls: type[Backend]
    plugin: PluginRecord
    duplicates: list[str] = field(default_factory=list)


_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "paca_backend_override", default=None
)


def _blocked_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCKED_ENV, "").split(",") if n.strip()}


def _spec_error(spec: Any) -> TypeError:
    hint = ""
    if isinstance(spec, type) and issubclass(spec, Backend):
        hint = f" (for this class, pass its name {getattr(spec, 'name', '?')!r} or an instance)"
    return TypeError(
        f"a paca backend is given by name (a str such as 'cpu') or as a "
        f"paca.backend_abc.Backend instance, not {type(spec).__name__} {spec!r}{hint}"
    )


class Registry:
    """Holds discovered plugins and backends; one per process (see :func:`registry`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._plugins: dict[str, list[PluginRecord]] | None = None  # by entry-point name
        self._entries: dict[str, _Entry] = {}
        self._rejected: dict[str, BackendInfo] = {}
        self._instances: dict[str, Backend] = {}
        self._build_errors: dict[str, str] = {}
        self._explicit: str | None = None
        self._blocked: set[str] = set()
        self._blocked_backends: dict[str, PluginRecord] = {}  # backend name -> provider
        self._warned: set[str] = set()
        self._last_auto: AutoSelection | None = None

    # ------------------------------------------------------------------ listing
    def _listed_plugins(self) -> dict[str, list[PluginRecord]]:
        """Entry points of the group, without importing anything."""
        if self._plugins is not None:
            return self._plugins
        plugins: dict[str, list[PluginRecord]] = {}
        seen: set[tuple[str, str, str]] = set()
        autoload = not env_flag(DISABLE_AUTOLOAD_ENV)
        for ep in importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "<unknown>"
            dist_version = dist.version if dist is not None else "?"
            key = (ep.name, ep.value, dist_name)
            if key in seen:  # editable installs can expose the same metadata twice
                continue
            seen.add(key)
            if not autoload and _canonical(dist_name) != BUILTIN_DISTRIBUTION:
                logger.debug("autoload off: skipping %s from %s", ep.name, dist_name)
                continue
            plugins.setdefault(ep.name, []).append(
                PluginRecord(ep.name, ep.value, dist_name, dist_version)
            )
        self._plugins = plugins
        return plugins

    def _is_blocked(self, *names: str) -> bool:
        """Whether any of ``names`` (plugin, backend or distribution) is on the block list."""
        return self._block_source(*names) is not None

    def _block_source(self, *names: str) -> str | None:
        """What blocks any of ``names``: ``"PACA_BLOCKED_BACKENDS=..."``, ``block_backend``."""
        wanted = {_canonical(n) for n in names}
        if wanted & {_canonical(n) for n in _blocked_from_env()}:
            return f"{BLOCKED_ENV}={os.environ.get(BLOCKED_ENV, '').strip()}"
        hit = sorted(n for n in self._blocked if _canonical(n) in wanted)
        if hit:
            return f"paca.block_backend({hit[0]!r})"
        return None

    def _warn_once(self, message: str, category: type[Warning], stacklevel: int = 4) -> None:
        if message in self._warned:
            return
        self._warned.add(message)
        warnings.warn(message, category, stacklevel=stacklevel)

    # ------------------------------------------------------------------ loading
    def _load(self, record: PluginRecord) -> None:
        if record.loaded or record.error is not None or record.blocked:
            return
        if self._is_blocked(record.name, record.distribution):
            record.blocked = True
            return
        ep = importlib_metadata.EntryPoint(record.name, record.value, hookspecs.ENTRY_POINT_GROUP)
        try:
            plugin = _call_plugin(ep.load)
        except _PluginFault as fault:  # a broken plugin must never break the others
            self._fail(record, f"failed to import {record.value!r}: {fault}")
            return
        try:
            if not self._pm.is_registered(plugin):  # two entry points may share a module
                self._pm.register(plugin, name=f"{record.distribution}:{record.name}")
        except Exception as exc:  # e.g. pluggy.PluginValidationError: wrong hook signature
            self._fail(record, f"could not be registered: {type(exc).__name__}: {exc}")
            return
        impls = [i for i in self._pm.hook.paca_backends.get_hookimpls() if i.plugin is plugin]
        if not impls:
            self._fail(
                record,
                f"{record.value!r} defines no paca_backends() hook; decorate it with "
                f"@paca.hookspecs.hookimpl and check the spelling",
            )
            return
        record.loaded = True
        for impl in impls:
            try:
                classes = _call_plugin(impl.function)
            except _PluginFault as fault:
                self._fail(record, f"paca_backends() raised {fault}")
                return
            if classes is None:
                continue
            if not isinstance(classes, (list, tuple)):
                self._fail(
                    record,
                    f"paca_backends() returned {classes!r}; return a list of Backend classes",
                )
                return
            for cls in classes:
                self._add(cls, record)

    def _fail(self, record: PluginRecord, message: str) -> None:
        record.error = message
        warnings.warn(
            f"paca: {record.label} was skipped: {message}. Other backends are unaffected; "
            f"fix or uninstall {record.distribution}, or set {BLOCKED_ENV}={record.name}.",
            PluginLoadWarning,
            stacklevel=4,
        )

    def _add(self, cls: Any, record: PluginRecord) -> None:
        name = getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, Backend)) or not isinstance(name, str):
            self._fail(
                record, f"returned {cls!r}, which is not a paca.backend_abc.Backend subclass"
            )
            return
        if self._is_blocked(name):
            self._blocked_backends[name] = record
            return
        reason = api_incompatibility(getattr(cls, "api_version", None), record.distribution)
        if reason is None and inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            reason = (
                f"does not implement the Backend methods {missing}; {record.distribution} is "
                f"incomplete or made for another paca version"
            )
        if reason is not None:
            self._rejected[name] = _info(name, cls, record, available=False, reason=reason)
            warnings.warn(
                f"paca: {record.label}: backend {name!r} {reason}", PluginLoadWarning, stacklevel=4
            )
            return
        existing = self._entries.get(name)
        if existing is not None and existing.cls is not cls:
            first, second = existing.plugin.label, record.label
            keep_new = record.builtin and not existing.plugin.builtin
            winner = record if keep_new else existing.plugin
            warnings.warn(
                f"paca: backend name {name!r} is provided twice: by {first} and by {second}; "
                f"using the one from {winner.distribution}. Uninstall one, or block it with "
                f"{BLOCKED_ENV}.",
                PluginLoadWarning,
                stacklevel=4,
            )
            loser = existing.plugin if keep_new else record
            if keep_new:
                self._entries[name] = _Entry(cls, record, [*existing.duplicates, loser.label])
            else:
                existing.duplicates.append(loser.label)
            return
        self._entries[name] = _Entry(cls, record)
        record.backends.append(name)
        if record.from_entry_point and name != record.name:
            same_dist = [
                r
                for r in self._listed_plugins().get(name, [])
                if _canonical(r.distribution) == _canonical(record.distribution)
            ]
            if not same_dist:
                self._warn_once(
                    f"paca: {record.label} provides backend {name!r} under the entry point "
                    f"{record.name!r}; paca finds a backend asked for by name through the entry "
                    f"point of that name, so asking for {name!r} imports every plugin. Add "
                    f'`{name} = "{record.value}"` to [project.entry-points."paca.backends"] of '
                    f"{record.distribution}.",
                    EntryPointNameWarning,
                    stacklevel=5,
                )

    def load_all(self) -> None:
        """Import every listed plugin (for listing and auto-detection)."""
        with self._lock:
            for records in self._listed_plugins().values():
                for record in records:
                    self._load(record)

    def _find(self, name: str) -> _Entry | None:
        with self._lock:
            if name in self._entries:
                return self._entries[name]
            for record in self._listed_plugins().get(name, []):  # the cheap, lazy path
                self._load(record)
            if name not in self._entries:
                self.load_all()
            return self._entries.get(name)

    # ---------------------------------------------------------------- public API
    def register(self, cls: type[Backend], distribution: str = "<runtime>") -> None:
        """Register a backend class directly (notebooks, tests, embedded use)."""
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(
                f"register_backend() takes a paca.backend_abc.Backend subclass, not {cls!r}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__}.name must be a non-empty str, not {name!r}")
        record = PluginRecord(
            name, f"{cls.__module__}:{cls.__qualname__}", distribution, "", from_entry_point=False
        )
        record.loaded = True
        with self._lock:
            self._instances.pop(name, None)
            self._build_errors.pop(name, None)
            self._entries.pop(name, None)
            self._rejected.pop(name, None)
            self._add(cls, record)

    def block(self, name: str) -> None:
        """Never load the plugin (entry-point name) or backend of this name."""
        if not isinstance(name, str) or not name.strip():
            raise TypeError(
                f"block_backend() takes a backend, plugin or distribution name, not {name!r}"
            )
        with self._lock:
            self._blocked.add(name)
            self._entries.pop(name, None)
            self._instances.pop(name, None)

    def infos(self) -> list[BackendInfo]:
        """Every discovered backend, available or not, sorted by name."""
        self.load_all()
        with self._lock:
            entries = list(self._entries.items())
            rejected = dict(self._rejected)
        rows = {name: _info(name, e.cls, e.plugin, duplicates=e.duplicates) for name, e in entries}
        for name, info in rejected.items():
            rows.setdefault(name, info)
        return sorted(rows.values(), key=lambda i: i.name)

    def plugin_errors(self) -> list[PluginRecord]:
        """Plugins that failed to load, with the reason."""
        self.load_all()
        return [r for rs in self._listed_plugins().values() for r in rs if r.error]

    def blocked(self) -> list[str]:
        """What the block list kept out, as readable labels (plugins and backend names)."""
        self.load_all()
        labels = [r.label for rs in self._listed_plugins().values() for r in rs if r.blocked]
        labels += [
            f"backend {n!r} from {r.distribution}"
            for n, r in sorted(self._blocked_backends.items())
        ]
        return labels

    def build_errors(self) -> dict[str, str]:
        """Backends whose constructor raised in this process, with the message."""
        return dict(self._build_errors)

    def autoload_disabled(self) -> bool:
        """Whether ``PACA_DISABLE_PLUGIN_AUTOLOAD`` kept third-party plugins out."""
        return env_flag(DISABLE_AUTOLOAD_ENV)

    def instance(self, name: str) -> Backend:
        """The (cached) instance of backend ``name``; clear errors if it cannot be had.

        Raises :class:`UnknownBackendError`, :class:`BackendUnavailableError` (it cannot
        run here, or it is incompatible) or :class:`BackendBuildError` (it can, but its
        constructor raised).
        """
        if not isinstance(name, str):
            raise _spec_error(name)
        with self._lock:
            if name in self._instances:
                return self._instances[name]
            entry = self._find(name)
            if entry is None:
                rejected = self._rejected.get(name)
                if rejected is not None:  # found, but incompatible: say so, not "unknown"
                    raise BackendUnavailableError(
                        f"paca backend {name!r} from {rejected.distribution} {rejected.version} "
                        f"cannot be used: {rejected.reason}."
                    )
                raise UnknownBackendError(self._unknown_message(name))
            reason = _availability(entry.cls, entry.plugin)[1]
            if reason is not None:
                raise BackendUnavailableError(
                    f"paca backend {name!r} ({entry.plugin.label}) is not available on this "
                    f"machine: {reason}. Available here: {', '.join(self.available_names()) or 'none'}."
                )
            return self._build(name, entry)

    def _build(self, name: str, entry: _Entry) -> Backend:
        if name in self._build_errors:
            raise BackendBuildError(self._build_errors[name])
        cls, record = entry.cls, entry.plugin
        try:
            backend = _call_plugin(cls)
            if not isinstance(backend, Backend):
                raise TypeError(f"{cls.__qualname__}() returned {backend!r}, not a Backend")
        except (_PluginFault, TypeError) as fault:
            source = f"{record.label}" if record.from_entry_point else f"registered {record.value}"
            message = (
                f"paca backend {name!r} ({source}) could not be constructed: "
                f"{cls.__qualname__}() raised {fault}. This is a bug in "
                f"{record.distribution}: report it there, or block it with {BLOCKED_ENV}={name}"
            )
            self._build_errors[name] = message
            raise BackendBuildError(message) from fault
        self._instances[name] = backend
        return backend

    def _adopt(self, backend: Backend) -> Backend:
        """Make a Backend instance the process's instance of its name (``use_backend(obj)``)."""
        name = getattr(backend, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{backend!r} has no backend name (set the class attribute `name`)")
        with self._lock:
            cached = self._instances.get(name)
            if cached is backend:
                return backend
            entry = self._find(name)
            if entry is None:
                self.register(type(backend))
                entry = self._entries.get(name)
                if entry is None:
                    rejected = self._rejected.get(name)
                    why = rejected.reason if rejected is not None else "it is blocked"
                    raise BackendUnavailableError(f"paca backend {name!r} cannot be used: {why}.")
            elif entry.cls is not type(backend):
                raise ValueError(
                    f"this {type(backend).__qualname__} instance is named {name!r}, but backend "
                    f"{name!r} is {entry.cls.__qualname__} ({entry.plugin.label}); give your "
                    f"class another name, or select {name!r} by name"
                )
            self._build_errors.pop(name, None)
            self._instances[name] = backend
            return backend

    def resolve(self, backend: str | Backend | None) -> Backend:
        """A backend from a name, an instance, or ``None`` (the selected one).

        Anything else raises a ``TypeError`` saying what is accepted.
        """
        if backend is None:
            return self.current()
        if isinstance(backend, Backend):
            return self._adopt(backend)
        if not isinstance(backend, str):
            raise _spec_error(backend)
        return self.current() if backend == "auto" else self.instance(backend)

    def available_names(self) -> list[str]:
        return [i.name for i in self.infos() if i.available]

    def _unknown_message(self, name: str) -> str:
        infos = self.infos()
        available = [i.name for i in infos if i.available]
        unavailable = [f"{i.name} ({i.reason})" for i in infos if not i.available]
        parts = [f"unknown paca backend {name!r}."]
        parts.append(f"Available: {', '.join(available) or 'none'}.")
        if unavailable:
            parts.append(f"Installed but unavailable: {'; '.join(unavailable)}.")
        failed = self.plugin_errors()
        if failed:
            parts.append(
                "Plugins that failed to load: "
                + "; ".join(f"{r.label}: {r.error}" for r in failed)
                + "."
            )
        if self._is_blocked(name) or name in self._blocked_backends:
            parts.append(
                f"{name!r} is on the block list ({self._block_source(name) or BLOCKED_ENV}); "
                f"remove it from there to use it."
            )
        elif self.autoload_disabled():
            parts.append(
                f"{DISABLE_AUTOLOAD_ENV} is set, so only backends built into paca are loaded; "
                f"unset it to use plugin backends."
            )
        parts.append(
            "Install the package that provides it (e.g. `pip install paca-<name>`), or pick one "
            "of the available backends."
        )
        return " ".join(parts)

    # ---------------------------------------------------------------- selection
    def use(self, backend: str | Backend | None) -> Backend | None:
        """Select a backend (name or instance) for this process (``None``/"auto": auto)."""
        with self._lock:
            if backend is None or (isinstance(backend, str) and backend == "auto"):
                self._explicit = None
                return None
            b = self.resolve(backend)
            self._explicit = b.name
            return b

    def selection(self) -> tuple[str, str]:
        """The backend name that :meth:`current` would return and why."""
        override = _override.get()
        if override is not None:
            return override, "explicit (paca.backend context)"
        if self._explicit is not None:
            return self._explicit, "explicit (paca.use_backend)"
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env and env != "auto":
            return env, f"environment ({BACKEND_ENV}={env})"
        return self._auto(), "auto-detected (highest-priority available backend)"

    def current(self) -> Backend:
        name, why = self.selection()
        try:
            return self.instance(name)
        except (UnknownBackendError, BackendUnavailableError, BackendBuildError) as exc:
            if not why.startswith("environment"):
                raise
            raise type(exc)(
                f"{BACKEND_ENV}={name} is set, but: {exc} Unset {BACKEND_ENV} to auto-detect."
            ) from None

    def _auto(self) -> str:
        report = self.auto_selection()
        if report.name is None:
            raise BackendUnavailableError(report.error or "paca found no backend to auto-detect")
        return report.name

    def auto_selection(self) -> AutoSelection:
        """Run auto-detection (constructing the winner) and say what it decided and why."""
        infos = self.infos()
        with self._lock:
            report = self._auto_select(infos)
            self._last_auto = report
        return report

    def _auto_select(self, infos: list[BackendInfo]) -> AutoSelection:
        candidates = [i for i in infos if i.available and i.auto_selectable]
        builtins = sorted(
            (i for i in candidates if i.builtin), key=lambda i: (-(i.priority or 0), i.name)
        )
        ceiling = max((i.priority or 0 for i in builtins), default=None)
        report = AutoSelection(None)
        third: list[BackendInfo] = []
        for i in candidates:
            if i.builtin:
                continue
            if ceiling is not None and i.priority == ceiling:
                tied = ", ".join(b.name for b in builtins if b.priority == ceiling)
                report.ties.append(
                    f"{i.name} ({i.distribution}) and the built-in {tied} have priority "
                    f"{ceiling}: built-ins win ties, so {i.name} is not auto-selected"
                )
            elif ceiling is None or (i.priority or 0) > ceiling:
                third.append(i)
        order: list[BackendInfo] = []
        for priority in sorted({i.priority or 0 for i in third}, reverse=True):
            group = sorted((i for i in third if i.priority == priority), key=lambda i: i.name)
            if len(group) > 1:
                names = ", ".join(f"{i.name} ({i.distribution})" for i in group)
                report.ties.append(
                    f"third-party backends {names} all declare priority {priority}: paca does "
                    f"not pick between them, so none is auto-selected; choose one with "
                    f"{BACKEND_ENV}=<name> or paca.use_backend(<name>), or block the others "
                    f"with {BLOCKED_ENV}"
                )
                continue
            order += group
        order += builtins
        for note in report.ties:
            self._warn_once(f"paca auto-detection: {note}.", SelectionWarning)
        for info in order:
            report.order.append(info.name)
            entry = self._entries.get(info.name)
            if entry is None:
                continue
            if info.name in self._instances:
                report.name = info.name
                return report
            try:
                self._build(info.name, entry)
            except BackendBuildError as exc:
                report.skipped.append(str(exc))
                self._warn_once(
                    f"paca auto-detection skipped backend {info.name!r}: {exc}. Trying the "
                    f"next available backend.",
                    SelectionWarning,
                )
                continue
            report.name = info.name
            return report
        report.error = self._nothing_to_select(infos, report)
        return report

    def _nothing_to_select(self, infos: list[BackendInfo], report: AutoSelection) -> str:
        parts = ["paca found no backend to auto-detect."]
        default_blocked = self._block_source(DEFAULT_BACKEND, BUILTIN_DISTRIBUTION)
        if default_blocked is not None:
            parts.append(
                f"The default backend {DEFAULT_BACKEND!r} is blocked by {default_blocked}; "
                f"remove it from there, or choose a backend with {BACKEND_ENV}=<name> or "
                f"paca.use_backend(<name>)."
            )
        elif DEFAULT_BACKEND not in {i.name for i in infos}:
            parts.append(
                f"The built-in {DEFAULT_BACKEND!r} backend is missing: reinstall paca "
                f"(pip install --force-reinstall paca)."
            )
        if report.skipped:
            parts.append("Could not be constructed: " + "; ".join(report.skipped) + ".")
        if report.ties:
            parts.append("Not picked: " + "; ".join(report.ties) + ".")
        by_name = [i for i in infos if i.available and not i.auto_selectable]
        if by_name:
            parts.append(
                "Available, but only when asked for by name: "
                + ", ".join(i.name for i in by_name)
                + f" (set {BACKEND_ENV}=<name>)."
            )
        unavailable = [f"{i.name} ({i.reason})" for i in infos if not i.available]
        if unavailable:
            parts.append("Unavailable: " + "; ".join(unavailable) + ".")
        return " ".join(parts)

    def last_auto_selection(self) -> AutoSelection | None:
        """The report of the latest auto-detection in this process, if one ran."""
        return self._last_auto

    @contextlib.contextmanager
    def using(self, backend: str | Backend) -> Iterator[Backend]:
        b = self.resolve(backend)
        token = _override.set(b.name)
        try:
            yield b
        finally:
            _override.reset(token)


def _canonical(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


def _availability(
    cls: type[Backend], record: PluginRecord | None = None
) -> tuple[bool, str | None]:
    """Ask a backend whether it can run here; a raising backend is reported, not fatal."""
    try:
        if _call_plugin(cls.is_available):
            return True, None
        reason = _call_plugin(cls.unavailable_reason)
        return False, reason or "is_available() returned False"
    except _PluginFault as fault:
        blame = (
            f" (a bug in {record.distribution} {record.version}; report it there, or block it "
            f"with {BLOCKED_ENV}={getattr(cls, 'name', record.name)})"
            if record is not None
            else ""
        )
        return False, f"is_available() raised {fault}{blame}"


def _auto_eligibility(cls: type[Backend], record: PluginRecord) -> tuple[bool, str | None]:
    """Whether auto-detection may consider ``cls`` at all, and if not, why."""
    priority = getattr(cls, "priority", None)
    if priority is None:
        return False, "priority None: used only when asked for by name"
    if isinstance(priority, bool) or not isinstance(priority, int):
        return False, f"priority {priority!r} is not an int, so it is used only by name"
    if record.builtin:
        return True, None
    if "priority" not in cls.__dict__:
        origin = next((k for k in cls.__mro__[1:] if "priority" in k.__dict__), None)
        source = origin.__qualname__ if origin is not None else "a base class"
        return False, (
            f"its priority {priority} is inherited from {source}, not declared by "
            f"{cls.__qualname__}; a third-party backend is auto-selected only when its own "
            f"class declares a priority above the built-ins'"
        )
    return True, None


def _capabilities(cls: type[Backend]) -> frozenset[str]:
    try:
        return frozenset(str(c) for c in getattr(cls, "capabilities", frozenset()))
    except TypeError:  # not iterable: the conformance suite names the mistake
        return frozenset()


def _info(
    name: str,
    cls: type[Backend],
    record: PluginRecord,
    *,
    available: bool | None = None,
    reason: str | None = None,
    duplicates: list[str] | tuple[str, ...] = (),
) -> BackendInfo:
    if available is None:
        available, reason = _availability(cls, record)
    auto, note = _auto_eligibility(cls, record)
    priority = getattr(cls, "priority", None)
    return BackendInfo(
        name=name,
        distribution=record.distribution,
        version=record.version,
        plugin=record.name,
        available=available,
        reason=reason,
        priority=priority if isinstance(priority, int) or priority is None else None,
        device_type=getattr(cls, "device_type", None),
        capabilities=_capabilities(cls),
        cls=cls,
        duplicates=tuple(duplicates),
        api_version=parse_api_version(getattr(cls, "api_version", None)),
        entry_point=record.name if record.from_entry_point else None,
        builtin=record.builtin,
        auto_selectable=auto,
        auto_note=note,
    )


_registry: Registry | None = None
_registry_lock = threading.Lock()


def registry() -> Registry:
    """The process-wide registry (created on first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def backend_by_name(name: str) -> Backend:
    """The process's instance of backend ``name`` (used to unpickle backends)."""
    return registry().instance(name)


def reset_registry() -> Registry:
    """Forget everything discovered (tests; after installing a plugin at run time)."""
    global _registry
    with _registry_lock:
        _registry = Registry()
        return _registry
