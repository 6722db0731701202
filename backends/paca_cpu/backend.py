"""The CPU reference backend: the three required primitives in plain torch.

The fused layer ops are the :class:`~paca.backend_abc.Backend` defaults with the column
swap (measured fastest here, see docs/architecture.md): nothing of the weight's size is
written per call, and the pretrained weight is bit-exact whenever no op is running.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from paca.backend_abc import Backend
from paca.environment import cpu_model


class CPUBackend(Backend):
    """Reference backend. Always available; computes with stock torch ops."""

    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    priority: ClassVar[int | None] = 0
    # "nf4": 4-bit bases via bitsandbytes' CPU kernels, probed when first needed
    # (Backend.capability_problem); the fused 4-bit ops are the Backend defaults.
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"float32", "bfloat16", "float16", "compile", "nf4"}
    )

    @classmethod
    def is_available(cls) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "device_name": cpu_model(),
            "threads": torch.get_num_threads(),
        }

    def gather(self, x: torch.Tensor, idx: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x.index_select(dim, idx)

    def delta_grad(
        self, grad_out: torch.Tensor, x_sel: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        # (x_selᵀ·dY)ᵀ: MKL runs this r-row form 2-4x faster than dYᵀ·x_sel on CPU
        if out_dtype == grad_out.dtype:
            # bf16/fp16 GEMMs accumulate in fp32 and round once: the result is what an
            # fp32 product rounded to out_dtype is, without an fp32 copy of grad_out
            return x_sel.t().mm(grad_out).t().contiguous()
        return x_sel.float().t().mm(grad_out.float()).t().contiguous().to(out_dtype)

    def write_columns(self, weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> None:
        weight.index_copy_(1, idx, columns.to(weight.dtype))
