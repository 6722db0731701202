"""QPaCA layers: PaCA around bitsandbytes 4-bit NF4 ``Linear4bit`` (a frozen 4-bit base).

The packed weight stays packed and is never written: the trained change is the
``out×r`` delta on the ``r`` selected input columns, computed with
:func:`paca.ops_quant.paca_linear_4bit` through the backend's ``"nf4"`` capability.
Everything else PaCA does works on the 4-bit base:

* selection: ``weight_norm`` reads ``dequant(W)`` (one layer at a time, transient);
  ``gradient`` gets the dense gradient of the dequantized layer from a probe
  (:meth:`PacaLinear4bit.dense_grad_probe`), never a gradient of the packed bytes;
* save/load, ``export_lora`` (a QLoRA-compatible adapter), disable and unload (the
  4-bit base is bit-exact throughout);
* ``merge`` into the 4-bit weight is refused (it would re-quantize the weight and lose
  the change); ``merge_and_unload`` returns a *dense* model instead: each 4-bit layer
  becomes an ``nn.Linear`` holding ``dequant(W)`` (in the dtype the weight was quantized
  from) with the delta merged in.

:func:`quantize_nf4` is the one call that turns a dense model's ``nn.Linear`` layers into
NF4 ``Linear4bit`` (what ``BitsAndBytesConfig(load_in_4bit=True)`` gives when loading).
bitsandbytes is imported only when a 4-bit layer exists or is asked for: ``import paca``
never imports it, and the layer predicate looks it up in ``sys.modules``.

FP4 (``quant_type="fp4"``) and 8-bit layers are refused with advice (NF4 is the format
QLoRA and the PaCA paper use).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from paca.backend_abc import Backend
from paca.layers_base import PacaLinear
from paca.ops import autocast_dtype
from paca.ops_quant import check_quant_state, nf4_dequantize, paca_linear_4bit, require_nf4


def _bnb_class(name: str) -> type | None:
    """A class of ``bitsandbytes.nn`` if bitsandbytes is already imported, else None."""
    mod = sys.modules.get("bitsandbytes.nn")
    return getattr(mod, name, None) if mod is not None else None


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (any quant type, any state)."""
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_nf4_linear(module: nn.Module) -> bool:
    """The layers QPaCA adapts: quantized NF4 ``Linear4bit`` with a 2-D quant state."""
    if not is_bnb_linear4bit(module):
        return False
    w = getattr(module, "weight", None)
    state = getattr(w, "quant_state", None)
    return (
        getattr(w, "quant_type", None) == "nf4"
        and bool(getattr(w, "bnb_quantized", False))
        and state is not None
        and not getattr(state, "packing_format_for_cpu", False)
        and len(getattr(state, "shape", ())) == 2
    )


def quantized_hint(module: nn.Module) -> str:
    """Advice for a quantized module QPaCA does not adapt ('' when there is none)."""
    w = getattr(module, "weight", None)
    if is_bnb_linear4bit(module):
        kind = getattr(w, "quant_type", None)
        if kind != "nf4":
            return (
                f". PaCA's 4-bit path (QPaCA) supports NF4 only, and this bitsandbytes "
                f"Linear4bit is {str(kind).upper()}: quantize with quant_type='nf4' "
                f"(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'), or "
                f"paca.quantize_nf4(model))"
            )
        if not getattr(w, "bnb_quantized", False) or getattr(w, "quant_state", None) is None:
            return (
                ". Its NF4 weight is not quantized yet: move the model to its device first "
                "(model.to('cpu') or .to('cuda') quantizes it; paca.wrap does this unless "
                "move_to_device=False)"
            )
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            return (
                ". Its NF4 weight was repacked by bitsandbytes for CPU inference (an eval-mode "
                "forward on an AVX512-BF16 CPU); reload the model and wrap it before running it"
            )
    cls8 = _bnb_class("Linear8bitLt")
    if cls8 is not None and isinstance(module, cls8):
        return (
            ". PaCA supports bitsandbytes 4-bit NF4 bases (QPaCA), not 8-bit Linear8bitLt: "
            "load with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4') "
            "instead of load_in_8bit=True"
        )
    return ""


class _DenseGradProbe(torch.autograd.Function):
    """Identity on ``y`` whose backward adds ``dYᵀ·x`` (the dense weight gradient of
    ``y = x·Wᵀ``) into ``acc``; ``token`` (a leaf requiring grad) keeps the graph alive
    when nothing else upstream requires grad (a frozen 4-bit model)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, token: torch.Tensor, acc: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.acc = acc
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        ctx.acc.add_(g.t().mm(x.reshape(-1, x.shape[-1]).float()))
        return grad, None, None, None


class PacaLinear4bit(PacaLinear):
    """PaCA around a bitsandbytes NF4 ``Linear4bit``: the packed base is never written."""

    def __init__(self, base_layer: nn.Module, backend: Backend) -> None:
        require_nf4(backend, self._describe(base_layer))
        check_quant_state(base_layer.weight.quant_state, self._describe(base_layer))
        super().__init__(base_layer, backend)
        self._shape_only = False
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _describe(base: nn.Module) -> str:
        return (
            f"a bitsandbytes {type(base).__name__}({base.in_features} -> {base.out_features}, "
            f"{getattr(base.weight, 'quant_type', '?')})"
        )

    # --- shapes and the dequantized view -------------------------------------------
    @property
    def quant_state(self) -> Any:
        return self.base_layer.weight.quant_state

    @property
    def in_features(self) -> int:
        return int(self.quant_state.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0])

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from (what ``dequant(W)`` is)."""
        return self.quant_state.dtype

    def weight_oi(self) -> torch.Tensor:
        """``dequant(W)`` as a new ``(out, in)`` tensor: a transient the caller drops.

        (While an adapter is added only its shape, dtype and device are read: a
        zero-stride stand-in of one element is returned then.)
        """
        w = self.base_layer.weight
        if self._shape_only or w.is_meta:
            return torch.empty((), dtype=self.dense_dtype, device=w.device).expand(
                self.out_features, self.in_features
            )
        return nf4_dequantize(w, self.quant_state)

    def add_adapter(self, name: str, idx: torch.Tensor, delta_dtype: str | None) -> None:
        self._shape_only = True
        try:
            super().add_adapter(name, idx, delta_dtype)
        finally:
            self._shape_only = False

    def delta_weight(self, name: str) -> torch.Tensor:
        w = self.base_layer.weight
        dense = torch.zeros(
            (self.out_features, self.in_features), dtype=torch.float32, device=w.device
        )
        dense.index_copy_(1, self.paca_idx[name], self.paca_delta[name].detach().float())
        return dense

    def set_backend(self, backend: Backend) -> None:
        require_nf4(backend, self._describe(self.base_layer))
        super().set_backend(backend)

    # --- forward -------------------------------------------------------------------
    def paca_forward(self, x: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        w = base.weight
        return paca_linear_4bit(
            x, w, w.quant_state, base.bias, delta, idx, self.backend, base.compute_dtype
        )

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained 4-bit layer, as ``Linear4bit.forward`` computes it, except that
        nothing of the layer is modified: bitsandbytes' own forward repacks the weight
        for CPU inference in eval mode (on AVX512-BF16 CPUs) and casts the bias in place."""
        import bitsandbytes as bnb

        base = self.base_layer
        w = base.weight
        dtype = autocast_dtype(x.device.type) or base.compute_dtype or x.dtype
        bias = base.bias.to(dtype) if base.bias is not None else None
        y = bnb.matmul_4bit(x.to(dtype), w.t(), bias=bias, quant_state=w.quant_state)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.forward takes one input tensor")
        if self._probe is not None:  # gradient selection: the pretrained layer, probed
            token, acc = self._probe
            return _DenseGradProbe.apply(self.base_forward(x), x, token, acc)
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters:
            return self.base_forward(x)
        return self.paca_forward(x, self.paca_delta[name], self.paca_idx[name])

    @contextlib.contextmanager
    def dense_grad_probe(self) -> Iterator[Callable[[], torch.Tensor]]:
        """Within the block the layer runs its 4-bit base and accumulates the gradient a
        dense ``dequant(W)`` would get (``dYᵀ·x``, fp32, ``(out, in)``); yields a function
        returning it. Used by ``selection="gradient"`` (the packed bytes have no gradient).
        """
        w = self.base_layer.weight
        acc = torch.zeros(
            (self.out_features, self.in_features), dtype=torch.float32, device=w.device
        )
        token = torch.zeros((), device=w.device, requires_grad=True)
        self._probe = (token, acc)
        try:
            yield lambda: acc
        finally:
            self._probe = None

    # --- merge -----------------------------------------------------------------------
    def plan_merge(self, names: Any) -> list[Any]:
        todo = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not todo:
            return []
        raise ValueError(
            "its base weight is 4-bit NF4 (bitsandbytes Linear4bit): writing the trained "
            "columns into it would re-quantize the weight and lose most of the change. Use "
            "merge_and_unload(), which returns a dense model (dequantized weights with the "
            "adapter merged), keep the adapter unmerged, or export it with paca.export_lora "
            "for QLoRA tooling"
        )

    def unmerge_to(self, count: int) -> None:
        if len(self.merged_adapters) > count:  # pragma: no cover - nothing merges into 4-bit
            super().unmerge_to(count)

    @torch.no_grad()
    def dequantized_layer(self) -> PacaLinear:
        """A dense :class:`PacaLinear` with the same adapters around an ``nn.Linear`` that
        holds ``dequant(W)`` (dtype: :attr:`dense_dtype`); what ``merge_and_unload`` merges
        into. The 4-bit layer itself is left unchanged."""
        base = self.base_layer
        w = base.weight
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=base.bias is not None,
            device=w.device,
            dtype=self.dense_dtype,
        )
        dense.weight.copy_(nf4_dequantize(w, self.quant_state, self.dense_dtype))
        dense.weight.requires_grad_(False)
        if base.bias is not None:
            dense.bias.copy_(base.bias.detach().to(self.dense_dtype))
            dense.bias.requires_grad_(base.bias.requires_grad)
        layer = PacaLinear(dense, self.backend)
        for name, delta in self.paca_delta.items():
            layer.paca_delta[name] = delta
            layer.paca_idx[name] = self.paca_idx[name]
            layer._paca_idx_master[name] = self._paca_idx_master[name]
        layer.active_adapter = self.active_adapter
        layer.disabled = self.disabled
        return layer


# --- one call on a dense model ------------------------------------------------------------
def _import_bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "paca.quantize_nf4 needs bitsandbytes: pip install -U 'bitsandbytes>=0.45'"
        ) from exc
    return bnb


def quantize_nf4(
    model: nn.Module,
    target_modules: list[str] | str | None = "all-linear",
    *,
    exclude_modules: list[str] | str | None = None,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace ``model``'s dense ``nn.Linear`` layers with bitsandbytes NF4 ``Linear4bit``.

    In place; returns ``model``. ``target_modules`` matches like
    :class:`paca.PacaConfig`'s (a list of names or name suffixes, a regex for the whole
    name, or ``"all-linear"``: every ``nn.Linear`` but the output head, as QLoRA does).
    Each weight is quantized where it lies (or on ``device``) with blocksize
    ``blocksize`` and, with ``double_quant``, quantized scales (QLoRA's defaults);
    ``compute_dtype`` defaults to the weight's dtype. Biases stay dense. A model on the
    meta device gets meta 4-bit layers (shapes only; what ``paca estimate`` runs).

    Unlike bitsandbytes' defaults, the layers never repack their weight for CPU inference
    (``support_avx512bf16_for_cpu = False``): the packed bytes stay those training uses.

    The result is what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))``
    builds; wrap it with :func:`paca.wrap` for QPaCA.
    """
    from paca.config import ALL_LINEAR, check_pattern
    from paca.names import matches, output_head_names, set_submodule

    bnb = _import_bnb()
    targets = check_pattern(target_modules, "quantize_nf4(target_modules)")
    excluded = check_pattern(exclude_modules, "quantize_nf4(exclude_modules)")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    chosen = []
    for name, module in model.named_modules():
        if not name or type(module) is not nn.Linear or matches(name, excluded):
            continue
        if targets == ALL_LINEAR:
            if name not in heads:
                chosen.append((name, module))
        elif matches(name, targets):
            chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"quantize_nf4: target_modules={target_modules!r} matches no dense nn.Linear of "
            f"{type(model).__name__}"
        )
    for name, linear in chosen:
        set_submodule(
            model,
            name,
            _to_linear4bit(
                bnb, linear, compute_dtype, double_quant, blocksize, quant_storage, device
            ),
        )
    # what transformers sets on a model loaded in 4-bit; PEFT reads it to pick its
    # bitsandbytes LoRA layers (QLoRA) instead of the dense ones
    model.is_loaded_in_4bit = True
    return model


@torch.no_grad()
def _to_linear4bit(
    bnb: Any,
    linear: nn.Linear,
    compute_dtype: torch.dtype | None,
    double_quant: bool,
    blocksize: int,
    quant_storage: torch.dtype,
    device: torch.device | str | None,
) -> nn.Module:
    w = linear.weight.detach()
    target = torch.device(device) if device is not None else w.device
    with torch.device("meta"):
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype or w.dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            quant_storage=quant_storage,
        )
    packed, state = bnb.functional.quantize_4bit(
        w.to(target).contiguous(),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
    )
    q.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
        module=q,
        bnb_quantized=True,
    )
    q.quant_state = state
    # bitsandbytes repacks a Linear4bit's weight in place for CPU inference on its first
    # eval-mode forward (AVX512-BF16 CPUs); its backward then has no autograd kernel, so a
    # QLoRA model evaluated before training would train with wrong gradients. Keep the
    # training layout.
    q.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(target), requires_grad=False)
    q.train(linear.training)
    return q
