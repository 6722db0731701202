"""Fake ``habana_frameworks.torch.distributed.hccl``.

The real module registers the ``"hccl"`` process-group backend with ``torch.distributed``
(``import habana_frameworks.torch.distributed.hccl; dist.init_process_group(backend="hccl")``,
gaudi-facts.md section 7). HCCL itself is NOT emulated: importing this module registers
nothing by default, so ``init_process_group(backend="hccl")`` fails as on a machine
without Gaudi.

Opt-in: ``FAKE_HCCL_AS_GLOO=1`` (read at import) registers ``"hccl"`` as an alias of the
gloo backend for CPU multi-process tests. The registration is process-wide and cannot be
undone; it is skipped if ``"hccl"`` is already registered.
"""

import os

import torch

HCCL_AS_GLOO = os.environ.get("FAKE_HCCL_AS_GLOO", "0") == "1"
registered_as_gloo = False


def _register_gloo_alias() -> bool:
    import torch.distributed as dist

    if not dist.is_available() or hasattr(dist.Backend, "HCCL"):
        return False
    from torch.distributed import ProcessGroupGloo

    def _create(store, rank, size, timeout):
        return ProcessGroupGloo(store, rank, size, timeout)

    dist.Backend.register_backend("hccl", _create, devices=["cpu", "hpu"])
    return True


if HCCL_AS_GLOO and torch.distributed.is_available():
    registered_as_gloo = _register_gloo_alias()
