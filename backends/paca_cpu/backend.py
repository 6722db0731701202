"""Plain-torch implementation of every :class:`paca.backend_abc.Backend` primitive."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from paca.backend_abc import Backend
from paca.environment import cpu_model


class CPUBackend(Backend):
    """Reference backend. Always available; computes with stock torch ops."""

    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    priority: ClassVar[int | None] = 0
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"float32", "bfloat16", "float16", "autocast", "compile"}
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

    def effective_weight(
        self, weight: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        columns = weight.index_select(1, idx).float() + delta.float()
        return weight.index_copy(1, idx, columns.to(weight.dtype))

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def input_grad(self, grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return grad_out.matmul(weight)

    def delta_grad(self, grad_out: torch.Tensor, x_sel: torch.Tensor) -> torch.Tensor:
        return grad_out.float().t().mm(x_sel.float())

    def write_columns(self, weight: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> None:
        weight.index_copy_(1, idx, columns.to(weight.dtype))
