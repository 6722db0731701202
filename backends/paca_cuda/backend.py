"""The CUDA backend: the CPU reference's math, computed with fewer, fused kernels.

What differs from :class:`paca_cpu.CPUBackend`:

* ``gather``: ``x[..., idx]`` is one Triton strided-gather kernel writing the contiguous
  saved activation (torch ``index_select`` without Triton).
* the column swap (:meth:`columns_applied`): ``W[:, idx] = round(W[:, idx] + delta)`` in
  place in one Triton kernel (fp32 add, one rounding; bit-identical to the reference),
  restored exactly after the GEMM; nothing of the weight's size is written per call.
* ``delta_grad``: for bf16/fp16 inputs and fp32 master deltas,
  ``torch.mm(dY^T, x_sel, out_dtype=float32)`` (cuBLAS with an fp32 result: fp32
  accumulation without upcasting the inputs); where that overload is missing, a split-N
  Triton GEMM with an fp32 accumulator; else the reference's upcast.
* Index tensors are reused on the device (a CPU index is copied once and cached), and no
  primitive reads a device value on the host, so forward/backward never synchronize and
  can be captured in a CUDA graph.

Kernel choice: ``CUDABackend(kernels=...)`` or ``PACA_CUDA_KERNELS`` = ``auto`` (Triton
when installed), ``torch`` (never Triton) or ``triton`` (always; with
``TRITON_INTERPRET=1`` this also runs the kernels on CPU tensors, for tests).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from paca_cpu import CPUBackend
from torch.utils.weak import WeakIdKeyDictionary

from paca_cuda import kernels

KERNELS_ENV = "PACA_CUDA_KERNELS"
KERNEL_MODES = ("auto", "triton", "torch")
_HALF = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CUDABackend(CPUBackend):
    """PaCA on NVIDIA GPUs (``torch.cuda``), tested against the CPU reference."""

    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    priority: ClassVar[int | None] = 200
    # "nf4": bitsandbytes' CUDA 4-bit kernels through the Backend defaults (not yet run
    # on a GPU by the paca test suite; probed when first needed).
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"float32", "bfloat16", "float16", "compile", "graphs", "nf4"}
    )

    def __init__(self, kernels: str | None = None) -> None:
        mode = (kernels or os.environ.get(KERNELS_ENV) or "auto").strip().lower()
        if mode not in KERNEL_MODES:
            raise ValueError(
                f"unknown CUDA kernel mode {mode!r} (from {KERNELS_ENV} or kernels=); "
                f"use one of {', '.join(KERNEL_MODES)}"
            )
        if mode == "triton" and not _triton_installed():
            raise ValueError(
                "CUDA kernel mode 'triton' needs Triton: pip install 'paca[cuda]' (or "
                "pip install triton), or use kernels='auto'/'torch'"
            )
        self.kernels = mode
        self._mm_out_dtype: dict[tuple[str, torch.dtype], bool] = {}
        self._sm_count: dict[int, int] = {}
        self._device_idx: WeakIdKeyDictionary = WeakIdKeyDictionary()

    # ----------------------------------------------------------------- discovery
    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(torch.cuda.is_available())
        except Exception:
            return False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls.is_available():
            return None
        built = getattr(torch.version, "cuda", None)
        if not built:
            return (
                f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA "
                f"build, e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126"
            )
        try:
            count = torch.cuda.device_count()
        except Exception as exc:  # a broken driver install
            return f"torch (CUDA {built}) cannot query devices: {type(exc).__name__}: {exc}"
        if count == 0:
            return (
                f"torch {torch.__version__} (CUDA {built}) sees no NVIDIA GPU; check nvidia-smi, "
                f"the driver, and CUDA_VISIBLE_DEVICES"
            )
        return f"torch.cuda.is_available() is False (is the driver too old for CUDA {built}?)"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.name,
            "device_type": self.device_type,
            "torch": torch.__version__,
            "torch_cuda": getattr(torch.version, "cuda", None),
            "kernels": self.kernels,
            "triton": _triton_version(),
        }
        try:
            if self.is_available():
                index = torch.cuda.current_device()
                props = torch.cuda.get_device_properties(index)
                info.update(
                    device_name=props.name,
                    compute_capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                )
        except Exception as exc:  # describe() must never raise
            info["device_error"] = f"{type(exc).__name__}: {exc}"
        return info

    # ------------------------------------------------------------ kernel choice
    def uses_triton(self, t: torch.Tensor) -> bool:
        """Whether this backend computes on ``t`` with its Triton kernels."""
        if self.kernels == "torch":
            return False
        if t.device.type == "cpu" and self.kernels != "triton":
            return False  # 'auto' never interprets kernels on CPU tensors
        return kernels.can_run_on(t)

    def _index_on(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``idx`` as a contiguous int64 tensor on ``device``, copied at most once."""
        if idx.device == device and idx.dtype == torch.long and idx.is_contiguous():
            return idx
        cached = self._device_idx.get(idx)
        key = (device, idx._version)
        if cached is None or cached[0] != key:
            moved = idx.to(device=device, dtype=torch.long).contiguous()
            self._device_idx[idx] = (key, moved)
            return moved
        return cached[1]

    # ------------------------------------------------------- compute primitives
    def gather(self, x: torch.Tensor, idx: torch.Tensor, dim: int = -1) -> torch.Tensor:
        last = dim in (-1, x.dim() - 1)
        if not (last and x.dim() >= 1 and self.uses_triton(x) and _flat_rows_ok(x)):
            return super().gather(x, self._index_on(idx, x.device), dim)
        idx_d = self._index_on(idx, x.device)
        flat = x.reshape(-1, x.shape[-1])  # a view: _flat_rows_ok checked it needs no copy
        out = kernels.load().gather_columns(flat, idx_d)
        return out.view(*x.shape[:-1], idx_d.numel())

    @contextmanager
    def columns_applied(
        self, weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor
    ) -> Iterator[None]:
        idx_d = self._index_on(idx, weight.device)
        if not self._columns_kernel_ok(weight, delta):
            with super().columns_applied(weight, idx_d, delta):
                yield
            return
        with torch.no_grad():
            w = weight.data
            saved = w.index_select(1, idx_d)
            kernels.load().write_effective_columns(w, w, idx_d, delta)  # elementwise, in place
            try:
                yield
            finally:
                self.write_columns(w, idx_d, saved)

    def delta_grad(
        self, grad_out: torch.Tensor, x_sel: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        half = grad_out.dtype in _HALF and x_sel.dtype == grad_out.dtype
        if half and out_dtype == torch.float32:
            if grad_out.is_cuda and self._has_mm_out_dtype(grad_out):
                return torch.mm(grad_out.t(), x_sel, out_dtype=torch.float32)
            if self.uses_triton(grad_out):
                return kernels.load().delta_grad(grad_out, x_sel, self._multiprocessors(grad_out))
        return super().delta_grad(grad_out, x_sel, out_dtype)

    def write_columns(self, weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> None:
        super().write_columns(weight, self._index_on(idx, weight.device), columns)

    # ------------------------------------------------------------------ helpers
    def _columns_kernel_ok(self, weight: torch.Tensor, delta: torch.Tensor) -> bool:
        return (
            weight.dim() == 2
            and delta.dim() == 2
            and weight.dtype in _KERNEL_DTYPES
            and delta.dtype in _KERNEL_DTYPES
            and delta.device == weight.device
            and self.uses_triton(weight)
        )

    def _has_mm_out_dtype(self, t: torch.Tensor) -> bool:
        """Whether ``torch.mm(..., out_dtype=float32)`` works for ``t``'s dtype (probed once)."""
        key = (t.device.type, t.dtype)
        known = self._mm_out_dtype.get(key)
        if known is not None:
            return known
        if torch.cuda.is_current_stream_capturing():
            return False  # never probe inside a graph capture; a fallback is captured instead
        try:
            probe = torch.ones((2, 2), dtype=t.dtype, device=t.device)
            ok = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        self._mm_out_dtype[key] = ok
        return ok

    def _multiprocessors(self, t: torch.Tensor) -> int:
        if not t.is_cuda:
            return 4
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if index not in self._sm_count:
            self._sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._sm_count[index]

    # ------------------------------------------------------------ device hooks
    def synchronize(self) -> None:
        if self.is_available():
            torch.cuda.synchronize()

    def memory_allocated(self) -> int | None:
        return int(torch.cuda.memory_allocated()) if self.is_available() else None

    def max_memory_allocated(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.is_available() else None

    def reset_peak_memory(self) -> None:
        if self.is_available():
            torch.cuda.reset_peak_memory_stats()


def _flat_rows_ok(x: torch.Tensor) -> bool:
    """Whether ``x.reshape(-1, x.shape[-1])`` is a view (the kernel takes strided rows)."""
    if x.dim() <= 2:
        return True
    try:
        x.view(-1, x.shape[-1])
    except RuntimeError:
        return False
    return True


def _triton_installed() -> bool:
    return kernels.triton_installed()


def _triton_version() -> str | None:
    if not _triton_installed():
        return None
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:
        return "unknown"
