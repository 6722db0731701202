"""Fake ``habana_frameworks.torch.core`` (``import habana_frameworks.torch.core as htcore``).

Like the real module it exposes ``habana_frameworks.torch.hpu`` as ``torch.hpu`` via
``torch._register_device_module('hpu', hpu)``. Re-importing the fake (after purging it
from ``sys.modules``) re-points ``torch.hpu`` at the new module instead of failing on
torch's "already registered" check.

Not emulated: the real module's monkey-patching of ``torch.manual_seed``,
``torch.nn.Module.__setattr__``/``add_module`` (module-name hooks) and
``torch.distributed.init_process_group``/``new_group`` (communicator caching).
"""

import sys

import torch

from habana_frameworks.torch import hpu
from habana_frameworks.torch.core.step_closure import (  # noqa: F401
    _mark_step_if_lazy,
    _run_step_closures,
    add_step_closure,
    iter_mark_step,
    mark_step,
)


def _register_hpu_module():
    existing = getattr(torch, "hpu", None)
    if existing is hpu:
        return
    if existing is None:
        torch._register_device_module("hpu", hpu)
        return
    if getattr(existing, "_IS_FAKE_HPU_MODULE", False):
        # A previous load of this fake: point torch.hpu at the fresh module.
        torch.hpu = hpu
        sys.modules["torch.hpu"] = hpu
        return
    raise RuntimeError(
        f"torch.hpu is already registered with {existing!r}, which is not the fake Gaudi SDK; "
        "refusing to shadow a real device module."
    )


_register_hpu_module()


def hpu_initialize(model=None, optimizer=None, args=None):
    """Real: reads quantization ranges / installs naming hooks. Fake: no-op."""
    return None


def get_device_count() -> int:
    return hpu.device_count()
