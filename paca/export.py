"""Export a PaCA adapter as a standard PEFT LoRA adapter, losslessly.

PaCA is a LoRA whose ``A`` is fixed: for a linear weight ``(out, in)`` with trained
columns ``idx``, ``A`` (r x in) has one-hot rows ``A[j, idx[j]] = 1`` and
``B = delta`` (out x r), with ``lora_alpha = r`` so the scaling is 1. transformers
``Conv1D`` is the same in PEFT (its LoRA layers are ``nn.Linear`` with
``fan_in_fan_out``). For ``nn.Conv2d`` PEFT's ``lora_A`` is a conv with the base kernel
size and ``lora_B`` a 1x1 conv, so a LoRA of rank ``r`` reaches only rank-``r`` kernel
changes; PaCA's ``(out, r, kh, kw)`` delta has rank up to ``r*kh*kw``. The export
therefore uses rank ``r*kh*kw`` there (``rank_pattern``): each ``A`` channel is a one-hot
kernel picking one (input channel, kernel position), and ``B`` is the delta reshaped.
Modules the adapter trains in full (``modules_to_save``) are written as PEFT writes its
own ``modules_to_save``: ``base_model.model.<module>.<tensor>`` (PEFT adds the
``modules_to_save.<adapter>.`` part back on load), their paths listed in the config's
``modules_to_save``. The result loads with stock ``peft.PeftModel.from_pretrained``.

The two files are written as one unit (:func:`paca.atomic.publish`, generations kept in
the hidden ``.paca-lora/``), so an interrupted or failed export leaves the previous export
or the new one. A folder holding a PaCA adapter (``paca_config.json``) is refused: the
PEFT files would sit next to the PaCA ones, and a folder must hold one format.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from paca import atomic
from paca.io import CONFIG_NAME, LEGACY_WEIGHTS_NAME, STORE, WEIGHTS_NAME, AdapterFormatError
from paca.layer import PacaLayer, PacaLinear
from paca.layers_conv import PacaConv1D, PacaConv2d
from paca.names import unknown_adapter

if TYPE_CHECKING:  # pragma: no cover
    from paca.model import PacaModel

LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
#: hidden sub-folder holding the export's generations (see :mod:`paca.atomic`).
LORA_STORE = ".paca-lora"


class ExportError(ValueError):
    """A PaCA adapter that a standard LoRA cannot represent exactly."""


def _one_hot_rows(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    a = torch.zeros(int(idx.numel()), n, dtype=dtype)
    a[torch.arange(int(idx.numel())), idx.cpu()] = 1
    return a


def _linear_pair(layer: PacaLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    delta = layer.paca_delta[name].detach().cpu()
    return _one_hot_rows(layer.paca_idx[name], layer.in_features, delta.dtype), delta.clone()


def _conv2d_pair(path: str, layer: PacaConv2d, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    base = layer.base_layer
    if tuple(base.dilation) != (1, 1) or base.padding_mode != "zeros":
        raise ExportError(
            f"module {path!r}: PEFT's LoRA Conv2d ignores dilation and padding_mode, so a "
            f"conv with dilation={tuple(base.dilation)}, padding_mode={base.padding_mode!r} "
            f"cannot be exported exactly; use paca's own save_pretrained for this adapter"
        )
    delta = layer.paca_delta[name].detach().cpu()  # (out, r, kh, kw)
    out, r, kh, kw = delta.shape
    idx = layer.paca_idx[name].cpu()
    a = torch.zeros(r * kh * kw, layer.in_features, kh, kw, dtype=delta.dtype)
    rows = torch.arange(r * kh * kw)
    chan = idx.repeat_interleave(kh * kw)
    pos = torch.arange(kh * kw).repeat(r)
    a[rows, chan, pos // kw, pos % kw] = 1
    b = delta.reshape(out, r * kh * kw, 1, 1).clone()
    return a, b


def export_lora(
    paca_model: PacaModel, directory: str | Path, adapter_name: str | None = None
) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a PEFT LoRA adapter.

    Produces ``adapter_config.json`` and ``adapter_model.safetensors`` in ``directory``
    (created if needed; not a folder holding a PaCA adapter: :class:`paca.io.AdapterFormatError`)
    and returns the directory. Load it with
    ``peft.PeftModel.from_pretrained(base_model, directory)``; its outputs equal the
    PaCA model's up to floating-point rounding (LoRA adds ``B(Ax)`` to ``Wx`` instead of
    computing with the merged weight). Raises :class:`ExportError` for layers LoRA
    cannot represent exactly.
    """
    from safetensors.torch import save_file

    name = adapter_name or paca_model.active_adapter
    if name not in paca_model.paca_configs:
        raise unknown_adapter(name, paca_model.paca_configs)
    paca_model.check_nothing_trainable_outside("export the LoRA adapter")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out: list[bool] = []
    for path, layer in paca_model.paca_layers():
        if name not in layer.paca_delta:
            continue
        if isinstance(layer, PacaConv2d):
            a, b = _conv2d_pair(path, layer, name)
        elif isinstance(layer, (PacaLinear, PacaConv1D)):
            a, b = _linear_pair(layer, name)
            fan_in_fan_out.append(isinstance(layer, PacaConv1D))
        else:
            raise ExportError(
                f"module {path!r}: no LoRA export for {type(layer).__name__} "
                f"({type(layer.base_layer).__name__})"
            )
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
        ranks[path] = int(a.shape[0])
    if not ranks:
        raise ExportError(f"adapter {name!r} has no layers to export")
    saved: list[str] = []
    for path, wrapper in paca_model.modules_to_save_wrappers():
        if name in wrapper.modules_to_save:
            for key, t in wrapper.modules_to_save[name].state_dict().items():
                tensors[f"base_model.model.{path}.{key}"] = t.detach().cpu().contiguous()
            saved.append(path)
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = _lora_config(paca_model, sorted(ranks), r, pattern, fan_in_fan_out)
    config["modules_to_save"] = sorted(saved) or None
    directory = Path(directory)
    _refuse_paca_folder(directory)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic.publish(
        directory,
        {
            LORA_WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            LORA_CONFIG_NAME: lambda p: p.write_text(text, encoding="utf-8"),
        },
        store=LORA_STORE,
    )
    return directory


def _refuse_paca_folder(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"export directory {str(directory)!r} is a file, not a directory")
    held = [n for n in (CONFIG_NAME, WEIGHTS_NAME, STORE) if os.path.lexists(directory / n)]
    if held:
        also = ""
        if (directory / LEGACY_WEIGHTS_NAME).is_file():
            also = f" (its weights are {LEGACY_WEIGHTS_NAME}, the file a LoRA export writes)"
        raise AdapterFormatError(
            f"{str(directory)!r} holds a PaCA adapter ({', '.join(held)}){also}; exporting a "
            f"PEFT LoRA into the same folder would mix two formats. Export into another folder, "
            f"e.g. {str(directory.with_name(directory.name + '-lora'))!r}"
        )


def _lora_config(
    paca_model: PacaModel,
    targets: list[str],
    r: int,
    pattern: dict[str, int],
    fan_in_fan_out: list[bool],
) -> dict[str, Any]:
    base_config = getattr(paca_model.model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": r,  # scaling = alpha / r = 1
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": bool(fan_in_fan_out) and all(fan_in_fan_out),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
