"""The PaCA layer: a frozen base layer plus, per named adapter, a trainable ``delta``
of shape ``(out, r, *kernel)`` and the buffer ``idx`` of its ``r`` input columns.

The base layer is kept untouched as a child module, so the pretrained weight is
always recoverable bit for bit: nothing is ever written into it except by an
explicit :meth:`PacaLayer.merge`, which keeps the overwritten columns and restores
them exactly on :meth:`PacaLayer.unmerge`.

:class:`PacaLayer` is what every layer type subclasses; :class:`PacaLinear` adapts
``nn.Linear``. The layer types are registered in one place, :mod:`paca.layer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from paca.backend_abc import Backend
from paca.config import DELTA_DTYPES
from paca.distributed import check_weight_layout, is_dtensor
from paca.ops import backend_key, paca_linear
from paca.steps import tag_parameter

_DTYPES = {name: getattr(torch, name) for name in DELTA_DTYPES}  # PacaConfig.delta_dtype


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


class MergeStep(NamedTuple):
    """One adapter's merge into one layer, computed before anything is written."""

    name: str
    idx: torch.Tensor
    original: torch.Tensor  # the columns it overwrites (restored by unmerge)
    merged: torch.Tensor  # the columns it writes, in the weight's dtype


def _sync_idx_master(module: nn.Module, _incompatible: Any) -> None:
    """After ``load_state_dict``: the loaded ``idx`` buffers become the CPU master copies."""
    master = module.__dict__.get("_paca_idx_master")
    if master is None:
        return
    for name in list(module.paca_idx.keys()):
        buf = module.paca_idx[name]
        if not buf.is_meta:
            master[name] = buf.detach().to(device="cpu", dtype=torch.long).clone()


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
        #: a CPU copy of each adapter's ``idx``: the buffer can be a meta tensor (a model
        #: built on ``torch.device("meta")``), and ``to_empty()`` fills it with garbage;
        #: :meth:`_apply` re-fills it from here when it leaves the meta device.
        self._paca_idx_master: dict[str, torch.Tensor] = {}
        self.backend = backend
        backend_key(backend)  # known to the custom op before any torch.compile trace
        self.register_load_state_dict_post_hook(_sync_idx_master)

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
        master = idx.detach().to(device="cpu", dtype=torch.long).clone()
        shape = (weight.shape[0], int(master.numel()), *weight.shape[2:])
        delta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=weight.device))
        tag_parameter(delta, self.backend)
        self.paca_delta[name] = delta
        self.paca_idx[name] = master.to(device=weight.device)
        self._paca_idx_master[name] = master
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.paca_delta[name]
        self.paca_idx.pop(name)
        self._paca_idx_master.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.paca_delta.keys()), None)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """``.to()``, ``to_empty()`` ...: an ``idx`` buffer that leaves the meta device or
        changes device is rewritten from the CPU master copy (``to_empty`` would leave it
        uninitialized), and a delta that leaves the meta device gets its initial value, zero
        (one on meta was never trained)."""
        devices = {n: b.device for n, b in self.paca_idx._buffers.items() if b is not None}
        meta_delta = [n for n, p in self.paca_delta.items() if p.is_meta]
        out = super()._apply(fn, recurse)
        with torch.no_grad():
            for n, before in devices.items():
                buf = self.paca_idx[n]
                moved = before.type == "meta" or buf.device != before
                if moved and not buf.is_meta and n in self._paca_idx_master:
                    self.paca_idx[n] = self._paca_idx_master[n].to(device=buf.device)
            for n in meta_delta:
                p = self.paca_delta[n]
                if not p.is_meta:
                    p.zero_()
        return out

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
    def plan_merge(self, names: Sequence[str]) -> list[MergeStep]:
        """What merging ``names`` (in order) would write, computed without writing anything.

        Each step holds the columns it overwrites (``original``, kept for an exact unmerge)
        and the merged columns ``round(W[:, idx] + delta)`` (fp32 add, rounded once to the
        weight's dtype), computed on top of the earlier steps. Already merged adapters are
        skipped.
        """
        todo = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not todo:
            return []
        weight = self.weight_oi()
        if weight.is_meta:
            raise ValueError(
                "its weight is on the meta device (no values); materialize the model "
                "(to_empty() and load the weights) before merging"
            )
        cols = torch.cat([self.paca_idx[n] for n in todo]).unique()  # sorted
        current = weight.index_select(1, cols)  # a copy: the plan never touches the weight
        steps = []
        for n in todo:
            idx = self.paca_idx[n]
            pos = torch.searchsorted(cols, idx)
            original = current.index_select(1, pos)
            merged = (original.float() + self.paca_delta[n].detach().float()).to(weight.dtype)
            current.index_copy_(1, pos, merged)
            steps.append(MergeStep(n, idx, original, merged))
        return steps

    @torch.no_grad()
    def apply_merge(self, steps: Sequence[MergeStep]) -> None:
        """Write a :meth:`plan_merge` plan. Each step's backup is recorded before its write,
        so :meth:`unmerge` (or :meth:`unmerge_to`) restores exactly even after a failed write."""
        weight = self.weight_oi()
        for step in steps:
            self._merge_backup[step.name] = step.original
            self.merged_adapters.append(step.name)
            self.backend.write_columns(weight, step.idx, step.merged)

    @torch.no_grad()
    def merge(self, name: str, safe: bool = False) -> None:
        """Write ``W[:, idx] + delta`` into the base weight (computed in fp32, rounded once).

        The overwritten columns are kept so :meth:`unmerge` restores them exactly. With
        ``safe=True`` the merged columns are checked for NaN/Inf in the weight's dtype
        first, and nothing is written when the check fails. (:meth:`PacaModel.merge` plans
        every layer before writing any.)
        """
        steps = self.plan_merge([name])
        if safe and not all(torch.isfinite(s.merged).all() for s in steps):
            raise ValueError(
                f"refusing to merge adapter {name!r}: the merged weight would contain NaN or Inf "
                f"in {self.weight_oi().dtype} ({self.__class__.__name__} around "
                f"{type(self.base_layer).__name__}); nothing was written"
            )
        self.apply_merge(steps)

    @torch.no_grad()
    def unmerge_to(self, count: int) -> None:
        """Unmerge the newest merged adapters until ``count`` remain, restoring exactly."""
        weight = self.weight_oi()
        while len(self.merged_adapters) > count:
            name = self.merged_adapters[-1]
            self.backend.write_columns(weight, self.paca_idx[name], self._merge_backup[name])
            self._merge_backup.pop(name)
            self.merged_adapters.pop()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the columns every merged adapter overwrote, newest first, exactly."""
        self.unmerge_to(0)

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
        weight = base.weight
        if not torch.compiler.is_compiling() and is_dtensor(weight):  # tensor parallelism
            check_weight_layout(weight, f"PaCA layer around {type(base).__name__}")
        return paca_linear(x, weight, base.bias, delta, idx, self.backend)


def is_dense_float(t: object) -> bool:
    """Whether ``t`` is a plain dense floating-point tensor (or ``nn.Parameter`` of one).

    Quantized weights are not: bitsandbytes ``Int8Params``/``Params4bit``, torchao's
    tensor subclasses (which may report a float dtype), int8 tensors, sparse layouts, and
    uninitialized (lazy) parameters. A layer type for such modules must be registered
    with :func:`paca.layer.register_layer_type` to adapt them.
    """
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.dtype.is_floating_point  # type: ignore[attr-defined]
        and t.layout == torch.strided  # type: ignore[attr-defined]
    )


def is_dense_linear(module: nn.Module) -> bool:
    """The modules :class:`PacaLinear` adapts: an ``nn.Linear`` (or subclass) whose weight
    is a dense float ``(out, in)`` tensor."""
    if not isinstance(module, nn.Linear):
        return False
    w = getattr(module, "weight", None)
    return is_dense_float(w) and tuple(w.shape) == (  # type: ignore[union-attr]
        module.out_features,
        module.in_features,
    )
