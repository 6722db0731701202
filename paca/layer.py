"""PaCA layers: a frozen base layer plus, per named adapter, a trainable ``delta``
of shape ``(out, r, *kernel)`` and the buffer ``idx`` of its ``r`` input columns.

The base layer is kept untouched as a child module, so the pretrained weight is
always recoverable bit for bit: nothing is ever written into it except by an
explicit :meth:`PacaLayer.merge`, which keeps the overwritten columns and restores
them exactly on :meth:`PacaLayer.unmerge`.

Layer types register with :func:`register_layer_type`; the model wrapper asks
:func:`layer_class_for` which class adapts a module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from paca.backend_abc import Backend
from paca.ops import backend_key, paca_linear
from paca.steps import tag_parameter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BufferDict(nn.Module):
    """A dict of tensors registered as buffers (so they move with ``.to()`` and save)."""

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self._persistent = persistent

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self._persistent)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]  # type: ignore[return-value]

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self) -> Iterable[str]:
        return self._buffers.keys()

    def pop(self, key: str) -> torch.Tensor:
        return self._buffers.pop(key)  # type: ignore[return-value]


class PacaLayer(nn.Module):
    """Common adapter bookkeeping; subclasses say how their weight maps to (out, in)."""

    #: Whether ``target_modules="all-linear"`` adapts this layer type (Linear, Conv1D).
    linear_like: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, backend: Backend) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.paca_delta = nn.ParameterDict()
        self.paca_idx = BufferDict()
        self._merge_backup = BufferDict(persistent=False)
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.backend = backend
        backend_key(backend)  # known to the custom op before any torch.compile trace

    def __getattr__(self, name: str) -> Any:
        """Attributes the layer lacks come from the base layer (``weight``, ``bias``,
        ``kernel_size`` ...): model code that reads them keeps working, as with PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("paca_") or name == "base_layer":
                raise
            return getattr(base, name)

    # --- what subclasses define -------------------------------------------------
    @property
    def in_features(self) -> int:
        """How many input columns/channels can be selected."""
        return int(self.weight_oi().shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight_oi().shape[0])

    def weight_oi(self) -> torch.Tensor:
        """The base weight as an ``(out, in, *kernel)`` view (no copy)."""
        return self.oi_view(self.base_layer.weight)

    def oi_view(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor laid out like the base weight (e.g. its gradient) as ``(out, in, ...)``."""
        return t

    def paca_forward(self, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- adapters --------------------------------------------------------------
    def add_adapter(self, name: str, idx: torch.Tensor, delta_dtype: str | None) -> None:
        weight = self.weight_oi()
        dtype = _DTYPES[delta_dtype] if delta_dtype else weight.dtype
        if not dtype.is_floating_point:
            raise TypeError(f"cannot train a PaCA delta in {dtype}; set delta_dtype='float32'")
        shape = (weight.shape[0], int(idx.numel()), *weight.shape[2:])
        delta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=weight.device))
        tag_parameter(delta, self.backend)
        self.paca_delta[name] = delta
        self.paca_idx[name] = idx.to(device=weight.device, dtype=torch.long)
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.paca_delta[name]
        self.paca_idx.pop(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.paca_delta.keys()), None)

    def set_backend(self, backend: Backend) -> None:
        self.backend = backend
        backend_key(backend)  # known to the custom op before any torch.compile trace
        for p in self.paca_delta.values():
            tag_parameter(p, backend)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense fp32 change this adapter makes to ``weight_oi()``."""
        weight = self.weight_oi()
        dense = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        dense.index_copy_(1, self.paca_idx[name], self.paca_delta[name].detach().float())
        return dense

    # --- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.paca_forward(x, self.paca_delta[name], self.paca_idx[name])

    # --- merge -----------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str, safe: bool = False) -> None:
        """Write ``W[:, idx] + delta`` into the base weight (computed in fp32, rounded once).

        The overwritten columns are kept so :meth:`unmerge` restores them exactly. With
        ``safe=True`` the merged columns are checked for NaN/Inf first, and nothing is
        written when the check fails.
        """
        if name in self.merged_adapters:
            return
        weight, idx = self.weight_oi(), self.paca_idx[name]
        original = weight.index_select(1, idx).clone()
        merged = original.float() + self.paca_delta[name].detach().float()
        if safe and not torch.isfinite(merged.to(weight.dtype)).all():
            raise ValueError(
                f"refusing to merge adapter {name!r}: the merged weight would contain NaN or Inf "
                f"({self.__class__.__name__} around {type(self.base_layer).__name__}); "
                f"the base weight was left untouched"
            )
        self._merge_backup[name] = original
        self.backend.write_columns(weight, idx, merged)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the columns every merged adapter overwrote, newest first, exactly."""
        weight = self.weight_oi()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.backend.write_columns(weight, self.paca_idx[name], self._merge_backup.pop(name))

    def extra_repr(self) -> str:
        ranks = {
            n: int(i.numel())
            for n, i in zip(self.paca_idx.keys(), self.paca_idx._buffers.values(), strict=True)
        }
        return f"r={ranks}, active={self.active_adapter!r}, backend={self.backend.name!r}"


class PacaLinear(PacaLayer):
    """PaCA around ``nn.Linear`` (and subclasses with a dense ``(out, in)`` weight)."""

    def paca_forward(self, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return paca_linear(x, base.weight, base.bias, delta, idx, self.backend)


# --- layer-type registry -----------------------------------------------------------
_LAYER_TYPES: list[tuple[Callable[[nn.Module], bool], type[PacaLayer]]] = []


def register_layer_type(
    predicate: Callable[[nn.Module], bool],
) -> Callable[[type[PacaLayer]], type[PacaLayer]]:
    """Register a PaCA layer class for modules ``predicate`` accepts (newest first)."""

    def deco(cls: type[PacaLayer]) -> type[PacaLayer]:
        _LAYER_TYPES.insert(0, (predicate, cls))
        return cls

    return deco


def _is_dense_linear(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and tuple(w.shape) == (
        module.out_features,
        module.in_features,
    )


register_layer_type(_is_dense_linear)(PacaLinear)


def layer_class_for(module: nn.Module) -> type[PacaLayer] | None:
    """The PaCA layer class that adapts ``module``, or None if none does."""
    for predicate, cls in _LAYER_TYPES:
        if predicate(module):
            return cls
    return None


def supported_type_names() -> list[str]:
    return sorted({cls.__name__ for _, cls in _LAYER_TYPES})


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be adapted, as advice the user can act on."""
    if isinstance(module, nn.Linear):
        w = getattr(module, "weight", None)
        return (
            f"its weight has shape {tuple(getattr(w, 'shape', ()))} instead of "
            f"({module.out_features}, {module.in_features}) (a quantized or sharded layer?); "
            f"quantized bases need a backend with the 'nf4' capability"
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (
            f"it is a grouped or depthwise convolution (groups={module.groups}); PaCA trains "
            f"whole input channels shared by every output channel and supports groups=1 only"
        )
    return f"PaCA supports {', '.join(supported_type_names())}"


# Conv1D / Conv2d layers register themselves on import (after the base classes exist).
from paca import layers_conv as _layers_conv  # noqa: E402,F401
