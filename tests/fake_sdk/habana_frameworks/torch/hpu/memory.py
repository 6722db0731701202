"""Fake ``torch.hpu`` memory API (mirrors the bridge's ``hpu/memory.py``).

Numbers come from the host process, since the fake "device" is the CPU:

* ``InUse``    = resident set size (``/proc/self/status`` VmRSS) minus the RSS measured when
  the fake was imported (clamped at 0), i.e. memory the process gained since the SDK loaded.
* ``MaxInUse`` = peak RSS (VmHWM) minus the same baseline. ``reset_peak_memory_stats()``
  resets the kernel's peak by writing ``5`` to ``/proc/self/clear_refs``; where that is not
  possible (non-Linux, restricted /proc) the peak is the maximum seen by these calls.
* ``Limit``    = ``FAKE_HPU_MEMORY_LIMIT`` or the host's physical RAM.
* ``NumAllocs``/``NumFrees``/``ActiveAllocs``/``MaxAllocSize``/``TotalSystem*``: not tracked
  (0); the CPU allocator keeps no such counters.

As in the bridge: ``max_memory_allocated`` = ``memory_stats()["MaxInUse"]``,
``memory_allocated`` = ``["InUse"]``, ``memory_reserved`` = ``["Limit"]``,
``mem_get_info`` = ``(Limit - InUse, Limit)``; an invalid device id (or no device)
raises ``AssertionError("Invalid device id")``.
"""

import os
import resource
import sys
import warnings

from habana_frameworks import _fake_config

from ._utils import _get_device_index

__all__ = [
    "max_memory_allocated",
    "memory_allocated",
    "reset_peak_memory_stats",
    "reset_accumulated_memory_stats",
    "memory_stats",
    "memory_summary",
    "memory_reserved",
    "max_memory_reserved",
    "memory_cached",
    "max_memory_cached",
    "mem_get_info",
]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _read_status():
    """(rss_bytes, hwm_bytes) from /proc, or (None, None)."""
    rss = hwm = None
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def _maxrss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _rss_bytes():
    rss, _ = _read_status()
    return rss if rss is not None else _maxrss_bytes()


_BASELINE = _rss_bytes()
_sampled_peak = _BASELINE
_peak_resettable = os.path.exists(_CLEAR_REFS)


def _current():
    global _sampled_peak
    rss, hwm = _read_status()
    if rss is None:
        rss = _maxrss_bytes()
    _sampled_peak = max(_sampled_peak, rss)
    peak = _sampled_peak
    if hwm is not None and _peak_resettable:
        peak = max(hwm, rss)
    return max(0, rss - _BASELINE), max(0, peak - _BASELINE)


def _check(device):
    from habana_frameworks.torch import hpu

    hpu.init()
    device = _get_device_index(device)
    if device < 0 or device >= hpu.device_count():
        raise AssertionError("Invalid device id")
    return device


def memory_stats(device=None) -> dict:
    """Dict with the real key set (values described in the module docstring)."""
    _check(device)
    in_use, max_in_use = _current()
    return {
        "Limit": int(_fake_config.MEMORY_LIMIT),
        "InUse": int(in_use),
        "MaxInUse": int(max(max_in_use, in_use)),
        "NumAllocs": 0,
        "NumFrees": 0,
        "ActiveAllocs": 0,
        "MaxAllocSize": 0,
        "TotalSystemAllocs": 0,
        "TotalSystemFrees": 0,
        "TotalActiveAllocs": 0,
    }


def max_memory_allocated(device=None) -> int:
    return memory_stats(device)["MaxInUse"]


def memory_allocated(device=None) -> int:
    return memory_stats(device)["InUse"]


def reset_peak_memory_stats(device=None) -> None:
    global _sampled_peak, _peak_resettable
    _check(device)
    rss = _rss_bytes()
    _sampled_peak = rss
    if _peak_resettable:
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            _peak_resettable = False


def reset_accumulated_memory_stats(device=None) -> None:
    _check(device)


def memory_summary(device=None) -> str:
    dev = _check(device)
    stats = memory_stats(dev)
    lines = [f"PyTorch HPU memory summary, device ID {dev} (fake Gaudi SDK)"]
    lines += [f"{k}: {v}" for k, v in stats.items()]
    return "\n".join(lines) + "\n"


def memory_reserved(device=None) -> int:
    return memory_stats(device)["Limit"]


def max_memory_reserved(device=None) -> int:
    return memory_stats(device)["Limit"]


def memory_cached(device=None) -> int:
    warnings.warn(
        "torch.hpu.memory_cached has been renamed to torch.hpu.memory_reserved",
        FutureWarning,
        stacklevel=2,
    )
    return memory_reserved(device)


def max_memory_cached(device=None) -> int:
    warnings.warn(
        "torch.hpu.max_memory_cached has been renamed to torch.hpu.max_memory_reserved",
        FutureWarning,
        stacklevel=2,
    )
    return max_memory_reserved(device)


def mem_get_info(device=None) -> tuple:
    """(free, total) bytes."""
    stats = memory_stats(device)
    return (stats["Limit"] - stats["InUse"], stats["Limit"])
