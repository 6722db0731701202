"""Fake HPU streams and events. Work runs synchronously on the CPU, so streams are
no-ops; ``Event.elapsed_time`` measures real host time (ms) between ``record()`` calls."""

import contextlib
import time

__all__ = ["Stream", "Event", "stream", "current_stream", "default_stream", "set_stream"]


class Stream:
    def __init__(self, device=None, priority=0, **kwargs):
        self.device = device
        self.priority = priority
        self.is_capture = False

    def synchronize(self):
        return None

    def query(self):
        return True

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event


_DEFAULT_STREAM = Stream()
_current = [_DEFAULT_STREAM]


def default_stream(device=None):
    return _DEFAULT_STREAM


def current_stream(device=None):
    return _current[-1]


def set_stream(s):
    _current[-1] = s


@contextlib.contextmanager
def stream(s):
    if s is None:
        yield
        return
    _current.append(s)
    try:
        yield
    finally:
        _current.pop()


class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing = enable_timing
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def synchronize(self):
        return None

    def elapsed_time(self, end_event):
        if self._t is None or end_event._t is None:
            raise RuntimeError("Both events must be recorded before calling elapsed_time()")
        return (end_event._t - self._t) * 1000.0
