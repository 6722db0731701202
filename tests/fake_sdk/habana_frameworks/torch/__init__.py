"""Fake ``habana_frameworks.torch`` (mirrors the bridge's 2021-24 ``torch/__init__.py``).

Import order and side effects follow the real module:

1. ``TORCHINDUCTOR_COMPILE_THREADS=1`` is set, ``habana_frameworks.autoload.is_loaded`` = True.
2. The execution mode is fixed now: the real bridge loads ``libhabana_pytorch_plugin.so``
   (lazy) or ``libhabana_pytorch2_plugin.so`` (eager/compile) here, so changing
   ``PT_HPU_LAZY_MODE`` after this import has no effect (the fake warns if it sees that).
3. ``core`` (registers ``torch.hpu``), ``distributed.hccl`` and ``hpu`` are imported.
4. The ``hpu_backend`` torch.compile backend is registered (deferred until ``torch._dynamo``
   is imported, see ``habana_frameworks.torch.dynamo``).
"""

import os
import warnings

os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"

import habana_frameworks.autoload  # noqa: E402

habana_frameworks.autoload.is_loaded = True

import torch  # noqa: E402

from habana_frameworks import _fake_config, _fake_events  # noqa: E402
from habana_frameworks.torch.utils.internal import is_lazy  # noqa: E402

if _fake_config.REQUIRE_TORCH_FORK and is_lazy():
    # Newer bridges: stock (non "+git"/"+hpu") torch builds are refused in lazy mode.
    _local = torch.__version__.split("+", 1)[1] if "+" in torch.__version__ else ""
    if not (_local.startswith("git") or _local.startswith("hpu")):
        raise AssertionError(
            f"Stock PyTorch version {torch.__version__} is not supported in Lazy mode."
        )

import habana_frameworks.torch.core  # noqa: E402,F401
import habana_frameworks.torch.distributed.hccl  # noqa: E402,F401
import habana_frameworks.torch.hpu  # noqa: E402,F401
from habana_frameworks.torch import dynamo as _dynamo  # noqa: E402
from habana_frameworks.torch import hpu  # noqa: E402,F401
from habana_frameworks.torch.version import __version__, version  # noqa: E402,F401

_dynamo.install()

_fake_events.record("sdk_import", __version__, "lazy" if is_lazy() else "eager")

if not hpu.is_available():
    warnings.warn("fake Gaudi SDK: FAKE_HPU_DEVICE_COUNT=0, no HPU is visible", stacklevel=2)
