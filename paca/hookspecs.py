"""Hook specifications a backend plugin implements (pluggy project name ``"paca"``).

A plugin is a module (or object) named by an entry point in the group
``paca.backends`` of its distribution's metadata, e.g. in ``pyproject.toml``::

    [project.entry-points."paca.backends"]
    mydev = "paca_mydev.plugin"

The entry point's name should be the name of the backend it provides: paca loads
only the entry point it needs when a backend is asked for by name, so a broken
or slow plugin costs nothing until it is used (a backend provided under another
entry-point name gets an ``EntryPointNameWarning``). Built-in backends register
exactly the same way.

What paca does with a plugin that misbehaves (each case is reported with the
plugin's distribution name and version, and no other backend is affected): a
module that raises on import, a hook that raises or returns something other than
a list of Backend classes (raising includes ``SystemExit`` and a
``KeyboardInterrupt`` the plugin raises itself; a real Ctrl-C still interrupts),
a module without a ``@hookimpl`` ``paca_backends``, a class for an incompatible
backend API version (``api_version``: an int or ``(major, minor)``; same major,
minor no newer than paca's) or with unimplemented primitives, a backend name
another distribution already provides, an ``is_available()`` or constructor that
raises (auto-detection skips it and takes the next backend).

A plugin cannot take over auto-detection: a third-party backend counts only when
its own class declares a ``priority`` above the available built-ins' (built-ins
win ties; third parties with equal priorities are not picked between). See
:mod:`paca._registry` for the full rule. Users can switch plugins off with
``PACA_BLOCKED_BACKENDS`` (backend, entry-point or distribution names) or
``PACA_DISABLE_PLUGIN_AUTOLOAD=1`` (built-ins only).

See ``docs/writing-a-backend.md`` for a walk-through and the full reference, and
:mod:`paca.testing` for the conformance suite every backend should pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend

PROJECT_NAME = "paca"
ENTRY_POINT_GROUP = "paca.backends"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorate a plugin's hook functions with this: ``@hookimpl def paca_backends(): ...``
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def paca_backends() -> list[type[Backend]]:
    """Return the :class:`paca.backend_abc.Backend` subclasses this plugin provides.

    Called once, when the plugin is loaded. Return classes, not instances: paca
    instantiates a backend only when it is selected. Do not import vendor SDKs
    here; check for them in ``Backend.is_available()`` (with
    ``importlib.util.find_spec``) and import them when the backend is first used.
    """
    raise NotImplementedError  # pragma: no cover - a spec, never called
