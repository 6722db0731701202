"""`HPUBackend`: PaCA on Intel Gaudi (HPU) in lazy, eager and torch.compile mode.

The arithmetic is the CPU reference's (it is subclassed), because those ops already
suit Gaudi's graph compiler: every shape depends only on ``r`` and the layer size
(``index_select`` / ``index_copy`` with a fixed 1-D index tensor, one GEMM), never on
data, so a graph compiled for step 1 is reused by every later step. What is Gaudi
specific is everything around the arithmetic:

* the execution mode is asked from the SDK once (``PT_HPU_LAZY_MODE``, whose default
  depends on the release) and decides the rest;
* lazy mode: ``mark_step`` at every step boundary through the core's step hooks, so
  user scripts never import ``htcore``;
* eager mode: never ``mark_step``; ``torch.compile(..., backend="hpu_backend")``;
* inference: HPU graphs (lazy mode only);
* indices are checked to live on the device as fixed int64 tensors (a host tensor would
  be copied every step and break the lazy graph);
* memory and synchronisation come from the bridge.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from paca_cpu.backend import CPUBackend
from torch import nn

from paca.backend_abc import BackendUnavailableError
from paca_hpu import sdk as _sdk

logger = logging.getLogger("paca.hpu")

COMPILE_BACKEND = "hpu_backend"

LAZY_COMPILE_MESSAGE = (
    "torch.compile on Gaudi needs eager mode, but the Intel Gaudi bridge was loaded in lazy "
    "mode (PT_HPU_LAZY_MODE=1, or unset on a release before 1.21). Set PT_HPU_LAZY_MODE=0 "
    "before the process starts to compile with backend='hpu_backend', or train without "
    "torch.compile in lazy mode (paca marks the steps for you)."
)


class HPUBackend(CPUBackend):
    """PaCA on Intel Gaudi through the ``habana_frameworks`` PyTorch bridge.

    Creating an instance imports the SDK; :meth:`is_available` only probes it and never
    raises. Attributes fixed at creation: ``lazy`` (the bridge's mode) and
    ``wants_step_hooks`` (true in lazy mode). ``step_hooks_enabled`` is set to False
    while something else already marks the steps (optimum-habana's ``GaudiTrainer``).
    """

    name: ClassVar[str] = "hpu"
    device_type: ClassVar[str] = "hpu"
    priority: ClassVar[int | None] = 300
    # The class lists both modes ("lazy" and HPU "graphs" when PT_HPU_LAZY_MODE=1,
    # "compile" when it is 0); an instance lists only what works in this process's mode.
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"float32", "bfloat16", "compile", "graphs", "lazy"}
    )
    #: The Gaudi recipe's compute dtype (bf16 autocast around forward and loss).
    default_autocast_dtype: ClassVar[torch.dtype] = torch.bfloat16

    def __init__(self) -> None:
        sdk, reason = _sdk.probe()
        if sdk is None or reason is not None:
            raise BackendUnavailableError(f"paca backend 'hpu' is not available: {reason}")
        self.sdk: _sdk.HabanaSDK = sdk
        self.lazy: bool = sdk.lazy
        # Per instance, because the mode is only known once the SDK is loaded: lazy mode
        # wants the step hooks and cannot compile; eager mode can compile, has no graphs.
        self.wants_step_hooks = sdk.lazy  # type: ignore[misc]
        drop = {"compile"} if sdk.lazy else {"lazy", "graphs"}
        self.capabilities = type(self).capabilities - drop  # type: ignore[misc]
        logger.info(
            "paca hpu backend: Intel Gaudi software %s, %s mode%s",
            sdk.version,
            self.mode,
            " (FAKE SDK for tests)" if sdk.fake else "",
        )

    # ----------------------------------------------------------------- discovery
    @classmethod
    def is_available(cls) -> bool:
        _, reason = _sdk.probe()
        return reason is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _sdk.probe()[1]

    def device(self, index: int | None = None) -> torch.device:
        kind = self.sdk.device_type
        return torch.device(kind, index) if index is not None else torch.device(kind)

    @property
    def mode(self) -> str:
        """``"lazy"`` or ``"eager"`` (eager includes torch.compile)."""
        return "lazy" if self.lazy else "eager"

    @property
    def autocast_device_type(self) -> str:
        """The ``device_type`` to pass to ``torch.autocast`` ("hpu" on a Gaudi)."""
        return self.sdk.autocast_device_type

    def autocast(self, dtype: torch.dtype | None = None, enabled: bool = True) -> torch.autocast:
        """``torch.autocast`` for the HPU, bf16 unless ``dtype`` says otherwise."""
        return torch.autocast(
            device_type=self.autocast_device_type,
            dtype=dtype or self.default_autocast_dtype,
            enabled=enabled,
        )

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.name,
            "device_type": self.device_type,
            "mode": self.mode,
            "sdk_version": self.sdk.version,
            "fake_sdk": self.sdk.fake,
            "device_count": self.sdk.device_count(),
            "optimum_habana": _sdk.optional_version("optimum-habana"),
            "env": _sdk.env_snapshot(),
        }
        try:
            info["device_name"] = self.sdk.hpu.get_device_name()
        except Exception as exc:  # describe() never raises
            info["device_name"] = f"unknown ({type(exc).__name__})"
        return info

    # ------------------------------------------------------- compute primitives
    def linear_forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_static_index(weight, idx)
        return super().linear_forward(x, weight, bias, delta, idx)

    def conv2d_forward(self, x: torch.Tensor, weight: torch.Tensor, *args: Any) -> Any:
        _check_static_index(weight, args[2])
        return super().conv2d_forward(x, weight, *args)

    # ------------------------------------------------- step and graph-mode hooks
    def mark_step(self) -> None:
        """Cut the lazy graph now (what ``htcore.mark_step()`` does); a no-op in eager mode."""
        if self.lazy:
            self.sdk.mark_step()

    def on_backward_end(self) -> None:
        self.mark_step()

    def on_optimizer_step(self) -> None:
        self.mark_step()

    def compile_backend(self) -> str | None:
        """``"hpu_backend"``, the bridge's torch.compile backend (usable in eager mode only:
        in lazy mode ``"compile"`` is missing from ``capabilities``; :meth:`compile` says why).
        """
        return COMPILE_BACKEND

    def compile(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """``torch.compile(model, backend="hpu_backend", **kwargs)``, with a clear error in lazy mode."""
        if self.lazy:
            raise RuntimeError(LAZY_COMPILE_MESSAGE)
        return torch.compile(model, backend=COMPILE_BACKEND, **kwargs)  # type: ignore[return-value]

    def prepare_for_inference(self, model: nn.Module) -> nn.Module:
        """Eval mode, and in lazy mode HPU graphs (``wrap_in_hpu_graph``) around ``model``.

        A replay returns the captured output tensors refreshed in place: clone an output
        before the next call if you keep it. In eager mode HPU graphs are not supported
        by the bridge, so the model is returned in eval mode only; compile it with
        ``torch.compile(model, backend=backend.compile_backend())`` for graph execution.
        Train no further through the returned module: HPU graphs do not propagate grads.
        """
        model.eval()
        if not self.lazy:
            logger.info("paca hpu: eager mode, no HPU graphs (they are lazy-mode only)")
            return model
        # wrap_in_hpu_graph replaces ``module.forward``. A paca model only delegates to the
        # model it wraps (``get_base_model()``), so graph that one (what optimum-habana
        # graphs, too).
        get_base = getattr(model, "get_base_model", None)
        target = get_base() if callable(get_base) else model
        self.sdk.hpu.wrap_in_hpu_graph(target)
        return model

    def synchronize(self) -> None:
        self.sdk.hpu.synchronize()

    def memory_allocated(self) -> int | None:
        return max(0, int(self.sdk.hpu.memory_allocated()))

    def max_memory_allocated(self) -> int | None:
        return max(0, int(self.sdk.hpu.max_memory_allocated()))

    def reset_peak_memory(self) -> None:
        self.sdk.hpu.reset_peak_memory_stats()


def _check_static_index(weight: torch.Tensor, idx: torch.Tensor) -> None:
    """Fail early, with advice, on index tensors that defeat Gaudi's graph caching."""
    if idx.device != weight.device:
        raise ValueError(
            f"PaCA column indices are on {idx.device} but the weight is on {weight.device}; "
            "on Gaudi they must live on the device as a fixed tensor (a host tensor is copied "
            "every step and breaks the lazy graph). Move the whole model with "
            "PacaModel.to_backend('hpu') or model.to(backend.device())."
        )
    if idx.dtype != torch.long or idx.dim() != 1:
        raise ValueError(
            f"PaCA column indices must be a 1-D int64 tensor, got {idx.dtype} with shape "
            f"{tuple(idx.shape)}"
        )
