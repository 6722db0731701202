"""Saving and loading PaCA adapters: ``adapter_model.safetensors`` + ``paca_config.json``.

Only the adapter is written: per adapted module its ``delta`` and its ``idx`` (the
trained columns), and per module in ``modules_to_save`` the adapter's trained copy
(``<module>.modules_to_save.<tensor>``, e.g. ``classifier.modules_to_save.weight``).
The saved indices are authoritative: a reload uses them as given and never re-runs a
selection strategy, so it reproduces exactly the same columns even if a strategy's code
changes or needed calibration data. The JSON records the
:class:`~paca.config.PacaConfig` (strategy included) and, per module, its type and
weight shape, so loading onto a different model is refused with a message saying what
differs. Each file is written to a temporary name and renamed into place; both files
carry the same fingerprint, so a pair from two different saves is detected on load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from paca.config import PacaConfig

if TYPE_CHECKING:  # pragma: no cover
    from paca.backend_abc import Backend
    from paca.model import PacaModel

logger = logging.getLogger("paca")

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "paca_config.json"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the model it is loaded onto."""


# ----------------------------------------------------------------------- writing
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: readers never see half a file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


#: infix of the saved tensors of a module trained in full (``modules_to_save``).
SAVED_MODULE_INFIX = "modules_to_save"


def adapter_tensors(
    model: PacaModel, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``{"<module>.delta": delta, "<module>.idx": idx}`` of one adapter, on CPU, plus
    ``"<module>.modules_to_save.<key>"`` for the tensors of its ``modules_to_save`` copies.

    With ``state_dict`` (as transformers' Trainer may pass one), deltas and copies are read
    from it where it holds them under their ``PacaModel`` state-dict key.
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.paca_layers():
        if adapter_name not in layer.paca_delta:
            continue
        delta = layer.paca_delta[adapter_name]
        if state_dict is not None:
            delta = state_dict.get(f"model.{path}.paca_delta.{adapter_name}", delta)
        out[f"{path}.delta"] = delta.detach().to("cpu").contiguous()
        out[f"{path}.idx"] = layer.paca_idx[adapter_name].detach().to("cpu").contiguous()
    for path, copy in _saved_copies(model, adapter_name):
        for key, tensor in copy.state_dict().items():
            if state_dict is not None:
                tensor = state_dict.get(
                    f"model.{path}.modules_to_save.{adapter_name}.{key}", tensor
                )
            out[f"{path}.{SAVED_MODULE_INFIX}.{key}"] = tensor.detach().to("cpu").contiguous()
    return out


def _saved_copies(model: PacaModel, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """``(path, trained copy)`` of each module ``adapter_name`` trains in full."""
    return [
        (path, wrapper.modules_to_save[adapter_name])
        for path, wrapper in model.modules_to_save_wrappers()
        if adapter_name in wrapper.modules_to_save
    ]


def _saved_module_records(model: PacaModel, adapter_name: str) -> dict[str, dict[str, Any]]:
    return {
        path: {
            "type": f"{type(copy).__module__}.{type(copy).__qualname__}",
            "tensors": {k: list(t.shape) for k, t in copy.state_dict().items()},
        }
        for path, copy in _saved_copies(model, adapter_name)
    }


def _module_records(model: PacaModel, adapter_name: str) -> dict[str, dict[str, Any]]:
    records = {}
    for path, layer in model.paca_layers():
        if adapter_name in layer.paca_delta:
            base = layer.base_layer
            records[path] = {
                "type": f"{type(base).__module__}.{type(base).__qualname__}",
                "weight_shape": list(base.weight.shape),
                "r": int(layer.paca_idx[adapter_name].numel()),
            }
    return records


def _base_identity(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def _fingerprint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(
    model: PacaModel,
    directory: str | Path,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` into ``directory``; returns the directory."""
    from safetensors.torch import save_file

    from paca import __version__

    if adapter_name not in model.paca_configs:
        raise KeyError(f"no adapter {adapter_name!r}; adapters: {sorted(model.paca_configs)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model, adapter_name, state_dict)
    meta = {
        "format_version": FORMAT_VERSION,
        "paca_version": __version__,
        "adapter_name": adapter_name,
        "config": model.paca_configs[adapter_name].to_dict(),
        "base_model": _base_identity(model.model),
        "modules": _module_records(model, adapter_name),
        "modules_to_save": _saved_module_records(model, adapter_name),
    }
    fingerprint = _fingerprint(tensors, meta)
    meta["fingerprint"] = fingerprint
    text = json.dumps(meta, indent=2, sort_keys=True)
    _atomic_write(
        directory / WEIGHTS_NAME,
        lambda p: save_file(
            tensors, str(p), metadata={"format": "pt", "paca_fingerprint": fingerprint}
        ),
    )
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text + "\n"))
    return directory


#: transformers/PEFT ``save_pretrained`` keyword arguments that mean nothing here.
_IGNORED_KWARGS = {
    "safe_serialization",
    "max_shard_size",
    "save_function",
    "variant",
    "token",
    "save_peft_format",
    "save_embedding_layers",
    "convert_pissa_to_lora",
    "path_initial_model_for_weight_conversion",
    "save_original_format",
}


def save_pretrained(
    model: PacaModel,
    save_directory: str | Path,
    adapter_name: str | None = None,
    **kwargs: Any,
) -> None:
    """:meth:`PacaModel.save_pretrained`: one adapter, or all (active one at the top)."""
    if not kwargs.pop("is_main_process", True):
        return
    if kwargs.pop("push_to_hub", False):
        raise ValueError("push_to_hub is not supported; upload the saved directory yourself")
    if kwargs.get("safe_serialization", True) is False:
        logger.warning("PaCA adapters are always saved as safetensors; safe_serialization=False")
    state_dict = kwargs.pop("state_dict", None)
    selected = kwargs.pop("selected_adapters", None)
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {unknown}")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_directory {str(directory)!r} is a file, not a directory")
    if adapter_name is not None:
        save_adapter(model, directory, adapter_name, state_dict)
        return
    names = list(selected) if selected else list(model.paca_configs)
    top = model.active_adapter if model.active_adapter in names else names[0]
    save_adapter(model, directory, top, state_dict)
    for name in names:
        if name != top:
            if name in {WEIGHTS_NAME, CONFIG_NAME} or "/" in name or name.startswith("."):
                raise ValueError(f"adapter name {name!r} cannot be used as a sub-directory")
            save_adapter(model, directory / name, name, state_dict)


# ----------------------------------------------------------------------- reading
def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors saved in ``directory``, checked to belong together."""
    from safetensors import safe_open

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        hint = ""
        if (directory / "adapter_config.json").is_file():
            hint = " (this looks like a PEFT adapter; load it with peft.PeftModel)"
        raise FileNotFoundError(
            f"no PaCA adapter in {str(directory)!r}: missing {', '.join(missing)}{hint}"
        )
    meta = json.loads(cfg_path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} has adapter format version {version!r}; this paca reads version "
            f"{FORMAT_VERSION}. Upgrade paca to load it."
        )
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(w_path), framework="pt") as f:
        file_print = (f.metadata() or {}).get("paca_fingerprint")
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            tensors[key] = f.get_tensor(key)
    if file_print != meta.get("fingerprint"):
        raise ValueError(
            f"{CONFIG_NAME} and {WEIGHTS_NAME} in {str(directory)!r} come from different saves "
            f"(an interrupted or mixed copy?); save the adapter again"
        )
    expected = {k: v for k, v in meta.items() if k != "fingerprint"}
    if _fingerprint(tensors, expected) != file_print:
        raise ValueError(
            f"{WEIGHTS_NAME} in {str(directory)!r} does not match its fingerprint (the file was "
            f"modified or corrupted); save the adapter again"
        )
    return meta, tensors


def _check_model(view: nn.Module, meta: dict[str, Any], config: PacaConfig) -> None:
    """Refuse a model whose target modules or their shapes differ from the saved ones."""
    from paca.model import (
        ModulesToSaveError,
        TargetModulesNotFoundError,
        find_modules_to_save,
        find_targets,
    )

    modules = dict(view.named_modules())
    saved: dict[str, dict[str, Any]] = meta["modules"]
    problems = []
    for path, rec in saved.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"module {path!r} does not exist in this model")
            continue
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        shape = list(getattr(getattr(module, "weight", None), "shape", []))
        if kind != rec["type"]:
            problems.append(f"module {path!r} is a {kind}, the adapter was saved for {rec['type']}")
        elif shape != rec["weight_shape"]:
            problems.append(
                f"module {path!r} has weight shape {shape}, the adapter has {rec['weight_shape']}"
            )
    to_save: dict[str, dict[str, Any]] = meta.get("modules_to_save", {})
    for path, rec in to_save.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"module {path!r} (modules_to_save) does not exist in this model")
            continue
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        if kind != rec["type"]:
            problems.append(
                f"module {path!r} (modules_to_save) is a {kind}, the adapter was saved for "
                f"{rec['type']}"
            )
            continue
        have = {k: list(t.shape) for k, t in module.state_dict().items()}
        for key in sorted(set(have) | set(rec["tensors"])):
            if have.get(key) != rec["tensors"].get(key):
                problems.append(
                    f"module {path!r} (modules_to_save) has {key!r} of shape "
                    f"{have.get(key)}, the adapter has {rec['tensors'].get(key)}"
                )
    try:
        targets = {n for n, _ in find_targets(view, dataclasses.replace(config, indices=None))}
    except (TargetModulesNotFoundError, TypeError) as e:
        targets = set()
        problems.append(f"the saved target_modules do not apply to this model: {e}")
    if not problems:
        try:
            matched = find_modules_to_save(view, config, targets)
        except ModulesToSaveError as e:
            problems.append(f"the saved modules_to_save do not apply to this model: {e}")
        else:
            if set(matched) != set(to_save):
                problems.append(
                    f"modules_to_save {config.modules_to_save} matches {sorted(matched)} in this "
                    f"model, the adapter saved {sorted(to_save)}"
                )
    extra = sorted(targets - set(saved))
    if extra:
        problems.append(
            f"this model has target modules the adapter does not cover: {extra[:10]}"
            + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        )
    if problems:
        raise AdapterMismatchError(
            f"the saved adapter (base model {meta['base_model']['class']}) does not fit this "
            f"model: " + "; ".join(problems[:10])
        )


def _check_keys(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    expected = {f"{p}.{s}" for p in meta["modules"] for s in ("delta", "idx")}
    for path, rec in meta.get("modules_to_save", {}).items():
        expected |= {f"{path}.{SAVED_MODULE_INFIX}.{k}" for k in rec["tensors"]}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterMismatchError(
            f"saved adapter tensors do not match its config: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}"
        )


def _indices(saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {p: tensors[f"{p}.idx"].tolist() for p in saved}


def _copy_deltas(
    model: PacaModel, adapter_name: str, tensors: dict[str, torch.Tensor], check_idx: bool
) -> None:
    copies = [  # (path, key, saved, live): shapes checked before anything is written
        (path, key, tensors[f"{path}.{SAVED_MODULE_INFIX}.{key}"], dst)
        for path, copy in _saved_copies(model, adapter_name)
        for key, dst in copy.state_dict().items()
    ]
    for path, key, src, dst in copies:
        if tuple(src.shape) != tuple(dst.shape):
            raise AdapterMismatchError(
                f"module {path!r} (modules_to_save): saved {key!r} has shape "
                f"{tuple(src.shape)}, this model's has {tuple(dst.shape)}"
            )
    for path, layer in model.paca_layers():
        if adapter_name not in layer.paca_delta:
            continue
        delta, idx = layer.paca_delta[adapter_name], layer.paca_idx[adapter_name]
        src, src_idx = tensors[f"{path}.delta"], tensors[f"{path}.idx"]
        if check_idx and not torch.equal(idx.cpu(), src_idx):
            raise AdapterMismatchError(
                f"module {path!r}: the saved adapter trains other columns than adapter "
                f"{adapter_name!r} of this model; load it as a new adapter instead"
            )
        if tuple(src.shape) != tuple(delta.shape):
            raise AdapterMismatchError(
                f"module {path!r}: saved delta has shape {tuple(src.shape)}, this model's "
                f"has {tuple(delta.shape)}"
            )
        with torch.no_grad():
            delta.copy_(src.to(device=delta.device, dtype=delta.dtype))
    for _, _, src, dst in copies:
        with torch.no_grad():
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def load_adapter(
    model: PacaModel, directory: str | Path, adapter_name: str, is_trainable: bool = False
) -> None:
    """Add the adapter saved in ``directory`` to ``model`` as ``adapter_name``."""
    meta, tensors = read_adapter(directory)
    config = PacaConfig.from_dict(meta["config"])
    saved = meta["modules"]
    _check_keys(meta, tensors)
    if adapter_name in model.paca_configs:
        raise ValueError(
            f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first "
            f"or load under another name"
        )
    _check_model(model._unwrapped_view(), meta, config)
    exact = dataclasses.replace(config, indices=_indices(saved, tensors))
    model.add_adapter(adapter_name, exact)
    model.paca_configs[adapter_name] = config  # as saved; the indices live in the layers
    _copy_deltas(model, adapter_name, tensors, check_idx=True)
    _set_trainable(model, adapter_name, is_trainable)


def load_adapter_weights(model: PacaModel, directory: str | Path, adapter_name: str) -> None:
    """Overwrite the deltas of existing adapter ``adapter_name`` (e.g. to resume training);
    the saved adapter must cover the same modules and columns."""
    meta, tensors = read_adapter(directory)
    saved = meta["modules"]
    _check_keys(meta, tensors)
    have = {p for p, layer in model.paca_layers() if adapter_name in layer.paca_delta}
    if have != set(saved):
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} covers other modules than the saved one: only in the "
            f"model {sorted(have - set(saved))[:10]}, only saved {sorted(set(saved) - have)[:10]}"
        )
    have_copies = {p for p, _ in _saved_copies(model, adapter_name)}
    saved_copies = set(meta.get("modules_to_save", {}))
    if have_copies != saved_copies:
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} trains other modules in full than the saved one "
            f"(modules_to_save): only in the model {sorted(have_copies - saved_copies)}, only "
            f"saved {sorted(saved_copies - have_copies)}"
        )
    _copy_deltas(model, adapter_name, tensors, check_idx=True)


def _set_trainable(model: PacaModel, adapter_name: str, trainable: bool) -> None:
    for _, layer in model.paca_layers():
        if adapter_name in layer.paca_delta:
            layer.paca_delta[adapter_name].requires_grad_(
                trainable and model.active_adapter == adapter_name
            )
    for _, copy in _saved_copies(model, adapter_name):
        for p in copy.parameters():
            p.requires_grad_(trainable and model.active_adapter == adapter_name)


def load(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    backend: Backend | str | None = None,
    is_trainable: bool = False,
) -> PacaModel:
    """Wrap ``model`` with the adapter saved in ``directory`` (from ``save_pretrained``).

    The saved indices are used as they are (no strategy runs). Missing or unexpected
    tensors, other target modules or other weight shapes are errors. With
    ``is_trainable=False`` the deltas are frozen and the model is put in eval mode.
    A :class:`PacaModel` gets the adapter added (:meth:`PacaModel.load_adapter`).
    """
    from paca.model import PacaModel, _BaseView, wrap

    if isinstance(model, PacaModel):
        model.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return model
    meta, tensors = read_adapter(directory)
    config = PacaConfig.from_dict(meta["config"])
    saved = meta["modules"]
    _check_keys(meta, tensors)
    _check_model(_BaseView(model), meta, config)
    exact = dataclasses.replace(config, indices=_indices(saved, tensors))
    paca_model = wrap(model, exact, adapter_name=adapter_name, backend=backend)
    paca_model.paca_configs[adapter_name] = config
    _copy_deltas(paca_model, adapter_name, tensors, check_idx=True)
    _set_trainable(paca_model, adapter_name, is_trainable)
    if not is_trainable:
        paca_model.eval()
    return paca_model
