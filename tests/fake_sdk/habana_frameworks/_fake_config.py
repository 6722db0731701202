"""Import-time configuration of the fake Gaudi SDK (read once, like the real bridge).

Environment variables (all read when ``habana_frameworks.torch`` is first imported):

``FAKE_SDK_VERSION`` (default ``"1.21.0"``)
    Emulated Intel Gaudi software release. It only chooses the default of
    ``PT_HPU_LAZY_MODE``: ``"1"`` (lazy) before 1.21, ``"0"`` (eager/compile) from 1.21
    (gaudi-facts.md section 2).
``PT_HPU_LAZY_MODE``
    ``"0"`` = eager / torch.compile, anything else = lazy. Unset -> version default.
``FAKE_HPU_DEVICE_COUNT`` (default ``1``), ``FAKE_HPU_DEVICE_NAME`` (default ``"GAUDI2"``)
``FAKE_HPU_MEMORY_LIMIT`` (bytes; default: physical RAM of this host)
``FAKE_HPU_EAGER_MARK_STEP`` (``"raise"`` default, or ``"noop"``)
    What ``mark_step()`` does in eager mode. The real bridge's ``@lazy_only`` decorator
    makes it a logged no-op; the fake raises by default so tests catch the misuse.
``FAKE_HPU_REQUIRE_TORCH_FORK`` (default ``"0"``)
    ``"1"`` emulates the newer bridge refusing stock PyTorch in lazy mode.
``FAKE_HPU_GRAPH_ALIAS_OUTPUTS`` (default ``"1"``)
    ``"1"``: an HPU-graph replay returns the *same* output tensors as the capture,
    refreshed in place, like the real ``wrap_in_hpu_graph``.
"""

from __future__ import annotations

import os


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 96 * 1024**3  # Gaudi2 HBM size as a fallback


#: First release whose bridge defaults PT_HPU_LAZY_MODE to "0" (gaudi-facts.md s.2).
EAGER_DEFAULT_SINCE = (1, 21)

SDK_VERSION: str = os.environ.get("FAKE_SDK_VERSION", "1.21.0")
SDK_VERSION_TUPLE = _version_tuple(SDK_VERSION)
LAZY_MODE_DEFAULT: str = "0" if SDK_VERSION_TUPLE[:2] >= EAGER_DEFAULT_SINCE else "1"
LAZY_MODE_ENV: str | None = os.environ.get("PT_HPU_LAZY_MODE")
LAZY: bool = (LAZY_MODE_ENV if LAZY_MODE_ENV is not None else LAZY_MODE_DEFAULT) != "0"

DEVICE_COUNT: int = max(0, int(os.environ.get("FAKE_HPU_DEVICE_COUNT", "1")))
DEVICE_NAME: str = os.environ.get("FAKE_HPU_DEVICE_NAME", "GAUDI2")
MEMORY_LIMIT: int = int(os.environ.get("FAKE_HPU_MEMORY_LIMIT", str(_physical_memory())))
EAGER_MARK_STEP: str = os.environ.get("FAKE_HPU_EAGER_MARK_STEP", "raise")
REQUIRE_TORCH_FORK: bool = os.environ.get("FAKE_HPU_REQUIRE_TORCH_FORK", "0") == "1"
GRAPH_ALIAS_OUTPUTS: bool = os.environ.get("FAKE_HPU_GRAPH_ALIAS_OUTPUTS", "1") == "1"
DYNAMIC_SHAPES_DEFAULT: bool = os.environ.get("PT_HPU_ENABLE_REFINE_DYNAMIC_SHAPES", "0") == "1"

if EAGER_MARK_STEP not in ("raise", "noop"):
    raise ValueError(f"FAKE_HPU_EAGER_MARK_STEP must be 'raise' or 'noop', got {EAGER_MARK_STEP!r}")
