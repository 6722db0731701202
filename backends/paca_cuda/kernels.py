"""Loading the Triton kernels lazily, and saying whether they can run on a tensor.

Triton is an optional dependency (the ``cuda`` extra): without it the backend uses
plain torch for every primitive. Compiled Triton kernels need a CUDA tensor; with
``TRITON_INTERPRET=1`` (set before the kernels are first imported) they also run on
CPU tensors, which is how the test suite checks them on machines without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

_MODULE = "paca_cuda._triton_kernels"


def triton_installed() -> bool:
    """Whether ``import triton`` can work (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def load() -> ModuleType:
    """The kernel module (imported on first use; raises ImportError without Triton)."""
    return importlib.import_module(_MODULE)


def interpreted() -> bool:
    """Whether the loaded kernels run in Triton's interpreter (CPU tensors only)."""
    return bool(load().INTERPRETED)


def can_run_on(t: torch.Tensor) -> bool:
    """Whether the (loaded or loadable) kernels can take tensor ``t``."""
    if not triton_installed():
        return False
    if t.device.type == "cpu":
        return interpreted()
    return t.device.type == "cuda" and not interpreted()
