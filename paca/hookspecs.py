"""Hook specifications a backend plugin implements (pluggy project name ``"paca"``).

A plugin is a module (or object) named by an entry point in the group
``paca.backends`` of its distribution's metadata, e.g. in ``pyproject.toml``::

    [project.entry-points."paca.backends"]
    mydev = "paca_mydev.plugin"

The entry point's name should be the name of the backend it provides: paca loads
only the entry point it needs when a backend is asked for by name, so a broken
or slow plugin costs nothing until it is used. Built-in backends register
exactly the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend

PROJECT_NAME = "paca"
ENTRY_POINT_GROUP = "paca.backends"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
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
