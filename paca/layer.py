"""PaCA layer types, registered in one place: which PaCA layer class adapts a module.

The built-in types, newest registration first (the first whose predicate accepts a
module adapts it):

* :class:`~paca.layers_quant.PacaLinear4bit`: bitsandbytes NF4 ``Linear4bit`` (QPaCA;
  bitsandbytes is looked up in ``sys.modules``, never imported here),
* :class:`~paca.layers_conv.PacaConv2d`: ``nn.Conv2d`` with ``groups=1``,
* :class:`~paca.layers_conv.PacaConv1D`: transformers ``Conv1D``,
* :class:`~paca.layers_base.PacaLinear`: ``nn.Linear`` with a dense float weight.

Another type registers with :func:`register_layer_type` (it is then asked first).
:func:`layer_class_for` answers which class adapts a module, :func:`unsupported_reason`
why none does. The layer classes live in :mod:`paca.layers_base` (the base class and
``PacaLinear``), :mod:`paca.layers_conv` and :mod:`paca.layers_quant`; this module
re-exports the base ones, so ``from paca.layer import PacaLayer`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from paca.distributed import sharded_weight_reason
from paca.layers_base import (
    BufferDict,
    MergeStep,
    PacaLayer,
    PacaLinear,
    is_dense_float,
    is_dense_linear,
)
from paca.layers_conv import PacaConv1D, PacaConv2d, is_hf_conv1d, is_plain_conv2d
from paca.layers_quant import PacaLinear4bit, is_nf4_linear, quantized_hint
from paca.names import type_name

__all__ = [
    "BufferDict",
    "MergeStep",
    "PacaLayer",
    "PacaLinear",
    "is_dense_float",
    "is_quantized_module",
    "layer_class_for",
    "register_layer_type",
    "supported_type_names",
    "unsupported_reason",
]

#: ``(predicate, layer class)``, newest registration first.
_LAYER_TYPES: list[tuple[Callable[[nn.Module], bool], type[PacaLayer]]] = []


def register_layer_type(
    predicate: Callable[[nn.Module], bool],
) -> Callable[[type[PacaLayer]], type[PacaLayer]]:
    """Register a PaCA layer class for modules ``predicate`` accepts (newest first)."""

    def deco(cls: type[PacaLayer]) -> type[PacaLayer]:
        _LAYER_TYPES.insert(0, (predicate, cls))
        return cls

    return deco


# the built-in types, oldest first (so the list reads as in the module docstring)
for _predicate, _cls in (
    (is_dense_linear, PacaLinear),
    (is_hf_conv1d, PacaConv1D),
    (is_plain_conv2d, PacaConv2d),
    (is_nf4_linear, PacaLinear4bit),
):
    register_layer_type(_predicate)(_cls)
del _predicate, _cls


def layer_class_for(module: nn.Module) -> type[PacaLayer] | None:
    """The PaCA layer class that adapts ``module``, or None if none does."""
    for predicate, cls in _LAYER_TYPES:
        if predicate(module):
            return cls
    return None


def supported_type_names() -> list[str]:
    return sorted({cls.__name__ for _, cls in _LAYER_TYPES})


#: module namespaces of quantization libraries whose ``*Linear*`` layers hold packed weights.
_QUANT_NAMESPACES = (
    "bitsandbytes",
    "torchao",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "hqq",
    "optimum.quanto",
    "quanto",
    "fbgemm_gpu",
    "compressed_tensors",
)


def is_quantized_module(module: nn.Module) -> bool:
    """Whether ``module`` looks like a quantized linear layer (whether or not a registered
    layer type accepts it): an ``nn.Linear`` whose weight is not a dense float tensor, a
    module with a ``qweight``, or a ``*Linear*`` class of a known quantization library."""
    if isinstance(module, nn.Linear):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.parameter.UninitializedParameter):
            return False
        if not is_dense_float(w):
            return True
    if isinstance(getattr(module, "qweight", None), torch.Tensor):
        return True
    cls = type(module)
    return cls.__module__.startswith(_QUANT_NAMESPACES) and "linear" in cls.__name__.lower()


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be adapted, as advice the user can act on."""
    sharded = sharded_weight_reason(module)  # fully_shard / zero.Init before paca.wrap
    if sharded is not None:
        return sharded
    w = getattr(module, "weight", None)
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "its weight is not initialized yet (a lazy layer): run one forward pass first"
    if is_quantized_module(module):
        what = (
            f"a {type_name(w)} of dtype {w.dtype}"
            if isinstance(w, torch.Tensor)
            else "packed (qweight)"
        )
        return (
            f"it is a quantized layer (its weight is {what}, not a dense float tensor) and "
            f"no registered PaCA layer type accepts this quantized module; load the model "
            f"unquantized (or dequantize it), or exclude this module"
            f"{quantized_hint(module)}"
        )
    if isinstance(module, nn.Linear):
        return (
            f"its weight has shape {tuple(getattr(w, 'shape', ()))} instead of "
            f"({module.out_features}, {module.in_features}) (a sharded layer?)"
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (
            f"it is a grouped or depthwise convolution (groups={module.groups}); PaCA trains "
            f"whole input channels shared by every output channel and supports groups=1 only"
        )
    return f"PaCA supports {', '.join(supported_type_names())}"
