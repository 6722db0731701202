"""Backend discovery and selection.

Discovery is lazy and cached: entry points of the group ``paca.backends`` are
*listed* cheaply from installed metadata, and a plugin module is imported only
when its backend is asked for by name, when auto-detection needs to ask it
whether it is available, or when the user lists backends. A plugin that fails
to import, raises from its hook, declares another API version or collides with
another plugin's backend name is reported by its distribution name and left
out; every other backend keeps working.

Users keep plugins out with ``PACA_BLOCKED_BACKENDS`` (comma-separated backend,
entry-point or distribution names; or :func:`paca.block_backend`) and
``PACA_DISABLE_PLUGIN_AUTOLOAD=1`` (only backends built into paca are listed).

Selection order: an explicit :func:`use_backend` / ``with paca.backend(...)``,
then the ``PACA_BACKEND`` environment variable, then auto-detection (the
available backend with the highest ``priority``: hpu, then cuda, then cpu).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata as importlib_metadata
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from paca import hookspecs
from paca.backend_abc import BACKEND_API_VERSION, Backend, BackendUnavailableError

logger = logging.getLogger("paca.registry")

BACKEND_ENV = "PACA_BACKEND"
DISABLE_AUTOLOAD_ENV = "PACA_DISABLE_PLUGIN_AUTOLOAD"
BLOCKED_ENV = "PACA_BLOCKED_BACKENDS"
#: Distribution whose entry points are "built-in" (kept when autoload is off).
BUILTIN_DISTRIBUTION = "paca"


class UnknownBackendError(KeyError, ValueError):
    """No installed plugin provides a backend of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginLoadWarning(UserWarning):
    """A backend plugin could not be loaded; the others are unaffected."""


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

    @property
    def label(self) -> str:
        return f"plugin {self.name!r} from distribution {self.distribution} {self.version}"


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


@dataclass
class _Entry:
    cls: type[Backend]
    plugin: PluginRecord
    duplicates: list[str] = field(default_factory=list)


_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "paca_backend_override", default=None
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _blocked_from_env() -> set[str]:
    return {n.strip() for n in os.environ.get(BLOCKED_ENV, "").split(",") if n.strip()}


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
        self._explicit: str | None = None
        self._blocked: set[str] = set()
        self._blocked_backends: dict[str, PluginRecord] = {}  # backend name -> provider

    # ------------------------------------------------------------------ listing
    def _listed_plugins(self) -> dict[str, list[PluginRecord]]:
        """Entry points of the group, without importing anything."""
        if self._plugins is not None:
            return self._plugins
        plugins: dict[str, list[PluginRecord]] = {}
        seen: set[tuple[str, str, str]] = set()
        autoload = not _env_flag(DISABLE_AUTOLOAD_ENV)
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
        blocked = {_canonical(n) for n in self._blocked | _blocked_from_env()}
        return any(_canonical(n) in blocked for n in names)

    # ------------------------------------------------------------------ loading
    def _load(self, record: PluginRecord) -> None:
        if record.loaded or record.error is not None or record.blocked:
            return
        if self._is_blocked(record.name, record.distribution):
            record.blocked = True
            return
        try:
            ep = importlib_metadata.EntryPoint(
                record.name, record.value, hookspecs.ENTRY_POINT_GROUP
            )
            plugin = ep.load()
        except (Exception, SystemExit) as exc:  # a broken plugin must never break the others
            self._fail(record, f"failed to import {record.value!r}: {type(exc).__name__}: {exc}")
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
                classes = impl.function()
            except (Exception, SystemExit) as exc:
                self._fail(record, f"paca_backends() raised {type(exc).__name__}: {exc}")
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
        version = getattr(cls, "api_version", None)
        reason = None
        if version != BACKEND_API_VERSION:
            reason = (
                f"written for paca backend API v{version}, but this paca speaks "
                f"v{BACKEND_API_VERSION}; install a version of {record.distribution} made for "
                f"this paca"
            )
        elif inspect.isabstract(cls):
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
            keep_new = (
                _canonical(record.distribution) == BUILTIN_DISTRIBUTION
                and _canonical(existing.plugin.distribution) != BUILTIN_DISTRIBUTION
            )
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
        record = PluginRecord(cls.name, f"{cls.__module__}:{cls.__qualname__}", distribution, "")
        record.loaded = True
        with self._lock:
            self._instances.pop(cls.name, None)
            self._entries.pop(cls.name, None)
            self._add(cls, record)

    def block(self, name: str) -> None:
        """Never load the plugin (entry-point name) or backend of this name."""
        with self._lock:
            self._blocked.add(name)
            self._entries.pop(name, None)
            self._instances.pop(name, None)

    def infos(self) -> list[BackendInfo]:
        """Every discovered backend, available or not, sorted by name."""
        self.load_all()
        rows = {
            name: _info(name, e.cls, e.plugin, duplicates=e.duplicates)
            for name, e in self._entries.items()
        }
        for name, info in self._rejected.items():
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

    def autoload_disabled(self) -> bool:
        """Whether ``PACA_DISABLE_PLUGIN_AUTOLOAD`` kept third-party plugins out."""
        return _env_flag(DISABLE_AUTOLOAD_ENV)

    def instance(self, name: str) -> Backend:
        """The (cached) instance of backend ``name``; clear errors if it cannot be had."""
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
            backend = entry.cls()
            self._instances[name] = backend
            return backend

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
                f"{name!r} is on the block list ({BLOCKED_ENV} or paca.block_backend()); "
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
    def use(self, name: str | None) -> Backend | None:
        """Select ``name`` for this process (``None``/"auto" clears the choice)."""
        with self._lock:
            if name is None or name == "auto":
                self._explicit = None
                return None
            backend = self.instance(name)
            self._explicit = name
            return backend

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
        return self.instance(self.selection()[0])

    def _auto(self) -> str:
        candidates = [i for i in self.infos() if i.available and i.priority is not None]
        if not candidates:
            raise BackendUnavailableError(
                "paca found no available backend to auto-detect; is the built-in 'cpu' backend "
                "installed (pip install paca)? Installed: "
                + (", ".join(f"{i.name} ({i.reason})" for i in self.infos()) or "none")
            )
        return max(candidates, key=lambda i: (i.priority, i.name)).name

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[Backend]:
        backend = self.instance(name)
        token = _override.set(name)
        try:
            yield backend
        finally:
            _override.reset(token)


def _canonical(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


def _availability(
    cls: type[Backend], record: PluginRecord | None = None
) -> tuple[bool, str | None]:
    """Ask a backend whether it can run here; a raising backend is reported, not fatal."""
    try:
        if cls.is_available():
            return True, None
        return False, cls.unavailable_reason() or "is_available() returned False"
    except Exception as exc:
        blame = (
            f" (a bug in {record.distribution} {record.version}; report it there, or block it "
            f"with {BLOCKED_ENV}={getattr(cls, 'name', record.name)})"
            if record is not None
            else ""
        )
        return False, f"is_available() raised {type(exc).__name__}: {exc}{blame}"


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
    return BackendInfo(
        name=name,
        distribution=record.distribution,
        version=record.version,
        plugin=record.name,
        available=available,
        reason=reason,
        priority=getattr(cls, "priority", None),
        device_type=getattr(cls, "device_type", None),
        capabilities=frozenset(getattr(cls, "capabilities", frozenset())),
        cls=cls,
        duplicates=tuple(duplicates),
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
