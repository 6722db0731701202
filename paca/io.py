"""Saving and loading PaCA adapters: ``paca_adapter.safetensors`` + ``paca_config.json``.

Only the adapter is written: per adapted module its ``delta`` and its ``idx`` (the
trained columns), and per module in ``modules_to_save`` the adapter's trained copy
(``<module>.modules_to_save.<tensor>``, e.g. ``classifier.modules_to_save.weight``).
The saved indices are authoritative: a reload uses them as given and never re-runs a
selection strategy, so it reproduces exactly the same columns even if a strategy's code
changes or needed calibration data. The JSON records the
:class:`~paca.config.PacaConfig` (strategy included) and, per module, its type and
weight shape, so loading onto a different model is refused with a message saying what
differs.

The two files are saved as one unit (:func:`paca.atomic.publish`): a folder always holds
one complete save, the previous or the new one, also when a save is killed, the disk
fills up, a writer fails, or several processes save into the folder at once (the last
commit wins). Both files carry the same fingerprint, and the weights file also a
checksum of its tensors and a copy of the config, so a damaged file, a config edited by
hand, or a pair of files from two saves (an interrupted copy) is reported naming the
file at fault. Adapters saved under the older weights name ``adapter_model.safetensors``
still load.

The PaCA weights file has its own name so that a PaCA folder and a PEFT LoRA folder
(``adapter_config.json`` + ``adapter_model.safetensors``, as :func:`paca.export_lora`
writes) cannot be mistaken for each other: saving into a folder that holds a PEFT adapter
is refused, and loading one with :func:`paca.load` says what it is and how to load it.

Loading matches the saved config against the model with :mod:`paca.targets` (on
:func:`~paca.targets.base_view` of the model): :func:`load_adapter` adds a saved adapter
to a :class:`~paca.model.PacaModel`; :func:`paca.load` (:func:`paca.model.load`) wraps a
plain model with one. Both are :func:`read_for_loading`, add the adapter, then
:func:`fill_adapter`. This module does not import :mod:`paca.model`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from paca import atomic, distributed
from paca.config import PacaConfig
from paca.names import type_name, unknown_adapter
from paca.targets import (
    ModulesToSaveError,
    TargetModulesNotFoundError,
    base_view,
    find_modules_to_save,
    find_targets,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only: paca.model imports this module
    from paca.model import PacaModel

logger = logging.getLogger("paca")

WEIGHTS_NAME = "paca_adapter.safetensors"
CONFIG_NAME = "paca_config.json"
#: the weights file's name in older paca versions, shared with PEFT: still read where
#: ``WEIGHTS_NAME`` is absent, and replaced by ``WEIGHTS_NAME`` on the next save.
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
#: hidden sub-folder holding the saved generations (see :mod:`paca.atomic`).
STORE = ".paca"
#: the files of a PEFT adapter (what :func:`paca.export_lora` writes).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the model it is loaded onto."""


class AdapterFormatError(ValueError):
    """A folder holds another adapter format than the one asked for (PaCA vs PEFT LoRA)."""


class AdapterFileError(ValueError):
    """A saved adapter file is unreadable, damaged, edited by hand, or from another save;
    ``path`` is the file (or, for two files that do not belong together, the folder)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


# ----------------------------------------------------------------------- writing
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
        out[f"{path}.delta"] = distributed.full_tensor(delta).to("cpu").contiguous()
        out[f"{path}.idx"] = layer.paca_idx[adapter_name].detach().to("cpu").contiguous()
    for path, copy in _saved_copies(model, adapter_name):
        for key, tensor in copy.state_dict().items():
            if state_dict is not None:
                tensor = state_dict.get(
                    f"model.{path}.modules_to_save.{adapter_name}.{key}", tensor
                )
            tensor = distributed.full_tensor(tensor)  # FSDP2: gathered on every rank
            out[f"{path}.{SAVED_MODULE_INFIX}.{key}"] = tensor.to("cpu").contiguous()
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
            "type": type_name(copy),
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
                "type": type_name(base),
                "weight_shape": list(distributed.full_shape(base.weight)),
                "r": int(layer.paca_idx[adapter_name].numel()),
            }
            state = getattr(base.weight, "quant_state", None)
            if state is not None:  # a 4-bit weight's shape is packed: also record (out, in)
                records[path]["shape_oi"] = [int(n) for n in state.shape]
    return records


def _base_identity(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "class": type_name(model),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def _hashes(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[str, str]:
    """``(fingerprint of meta + tensors, checksum of the tensors alone)`` in one pass."""
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    checksum = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        head = f"{key}:{t.dtype}:{tuple(t.shape)}".encode()
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for h in (fingerprint, checksum):
            h.update(head)
            h.update(data)
    return fingerprint.hexdigest(), checksum.hexdigest()


def _fingerprint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    return _hashes(tensors, meta)[0]


def _adapter_files(
    model: PacaModel, adapter_name: str, state_dict: dict[str, torch.Tensor] | None
) -> dict[str, atomic.Writer]:
    """``{file name: writer}`` of adapter ``adapter_name``: everything computed up front."""
    from paca import __version__

    if adapter_name not in model.paca_configs:
        raise unknown_adapter(adapter_name, model.paca_configs)
    tensors = adapter_tensors(model, adapter_name, state_dict)
    body = {
        "format_version": FORMAT_VERSION,
        "paca_version": __version__,
        "adapter_name": adapter_name,
        "config": model.paca_configs[adapter_name].to_dict(),
        "base_model": _base_identity(model.model),
        "modules": _module_records(model, adapter_name),
        "modules_to_save": _saved_module_records(model, adapter_name),
    }
    fingerprint, checksum = _hashes(tensors, body)
    text = json.dumps({**body, "fingerprint": fingerprint}, indent=2, sort_keys=True) + "\n"
    metadata = {
        "format": "pt",
        "paca_fingerprint": fingerprint,
        "paca_tensors_sha256": checksum,  # tells a damaged weights file from an edited config
        "paca_meta": json.dumps(body, sort_keys=True),  # the config as saved, to name edits
    }

    def write_weights(path: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)

    def write_config(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return {WEIGHTS_NAME: write_weights, CONFIG_NAME: write_config}


def _refuse_peft_folder(directory: Path) -> None:
    if os.path.lexists(directory / PEFT_CONFIG_NAME):
        raise AdapterFormatError(
            f"{str(directory)!r} holds a PEFT LoRA adapter ({PEFT_CONFIG_NAME}); a PaCA adapter "
            f"saved into the same folder could be mistaken for it. Save the PaCA adapter into "
            f"another folder, or delete {PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME} there first "
            f"if that LoRA is no longer needed"
        )


def _publish(directory: Path, files: dict[str, atomic.Writer]) -> None:
    legacy = (directory / LEGACY_WEIGHTS_NAME).is_file() and os.path.lexists(
        directory / CONFIG_NAME
    )  # a PaCA adapter saved by an older paca (PEFT folders are refused before)
    aliases = {WEIGHTS_NAME: LEGACY_WEIGHTS_NAME} if legacy else None
    atomic.publish(directory, files, store=STORE, aliases=aliases)


def save_adapter(
    model: PacaModel,
    directory: str | Path,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` into ``directory`` as one unit (see the
    module docstring); returns the directory."""
    directory = Path(directory)
    model.check_nothing_trainable_outside()  # their training would be dropped silently
    _refuse_peft_folder(directory)
    collective = distributed.is_sharded_model(model)  # every rank gathers, rank 0 writes
    files = _adapter_files(model, adapter_name, state_dict)
    distributed.write_once(lambda: _publish(directory, files), collective)
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
#: names an adapter saved into a sub-folder may not have.
_RESERVED = {WEIGHTS_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME, PEFT_CONFIG_NAME}


def save_pretrained(
    model: PacaModel,
    save_directory: str | Path,
    adapter_name: str | None = None,
    **kwargs: Any,
) -> None:
    """:meth:`PacaModel.save_pretrained`: one adapter, or all (active one at the top).

    Each adapter's folder is saved as a unit; with several adapters, each is its own unit.
    Every folder is checked (and every file computed) before the first one is written.
    """
    # Sharded deltas (FSDP2, ZeRO-3) are gathered on every rank, so every rank takes part
    # whatever is_main_process says; rank 0 alone writes (paca.distributed.write_once).
    collective = distributed.is_sharded_model(model)
    if not kwargs.pop("is_main_process", True) and not collective:
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
        targets = [(directory, adapter_name)]
    else:
        names = list(selected) if selected else list(model.paca_configs)
        top = model.active_adapter if model.active_adapter in names else names[0]
        targets = [(directory, top)]
        for name in names:
            if name != top:
                if name in _RESERVED or "/" in name or "\\" in name or name.startswith("."):
                    raise ValueError(f"adapter name {name!r} cannot be used as a sub-directory")
                targets.append((directory / name, name))
    for folder, _ in targets:
        _refuse_peft_folder(folder)
    with distributed.gathered(
        p for _, w in model.modules_to_save_wrappers() for p in w.parameters()
    ):
        files = [(folder, _adapter_files(model, name, state_dict)) for folder, name in targets]

    def publish_all() -> None:
        for folder, writers in files:
            _publish(folder, writers)

    distributed.write_once(publish_all, collective)


# ----------------------------------------------------------------------- reading
class _Saved(NamedTuple):
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_path: Path  # as the user knows them (inside the folder), for messages
    weights_path: Path


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors saved in ``directory``, checked to belong together."""
    saved = _read(directory)
    return saved.meta, saved.tensors


def _read(directory: str | Path) -> _Saved:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no PaCA adapter at {str(directory)!r}: no such folder")
    if not directory.is_dir():
        hint = ""
        if directory.name in {CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME}:
            hint = f"; pass the folder that holds it ({str(directory.parent)!r})"
        raise FileNotFoundError(f"{str(directory)!r} is a file, not an adapter folder{hint}")
    return atomic.read_unit(
        directory,
        (CONFIG_NAME, WEIGHTS_NAME),
        functools.partial(_read_files, directory),
        store=STORE,
        aliases={WEIGHTS_NAME: LEGACY_WEIGHTS_NAME},
    )


def _read_files(directory: Path, found: dict[str, atomic.Found | None]) -> _Saved:
    cfg, weights = found[CONFIG_NAME], found[WEIGHTS_NAME]
    if cfg is None or weights is None:
        _explain_missing(directory, missing=[n for n, f in found.items() if f is None])
    assert cfg is not None and weights is not None
    meta = _read_config(cfg.shown, cfg.real)
    metadata, tensors = _read_weights(weights.shown, weights.real)
    if "paca_fingerprint" not in metadata:
        if weights.shown.name == LEGACY_WEIGHTS_NAME and (directory / PEFT_CONFIG_NAME).is_file():
            raise AdapterFormatError(
                f"{weights.shown} holds a PEFT LoRA adapter (with {PEFT_CONFIG_NAME}), not the "
                f"PaCA weights {CONFIG_NAME} belongs to: an export_lora into this folder by an "
                f"older paca overwrote them, and that PaCA adapter cannot be recovered. Load the "
                f"LoRA with peft.PeftModel.from_pretrained(base_model, {str(directory)!r})"
            )
        raise AdapterFileError(
            f"{weights.shown} is not a PaCA weights file (it lacks the paca_fingerprint "
            f"save_pretrained records); save the adapter again with save_pretrained",
            weights.shown,
        )
    _check_fingerprints(meta, metadata, tensors, cfg.shown, weights.shown)
    _check_structure(meta, cfg.shown)
    return _Saved(meta, tensors, cfg.shown, weights.shown)


def _explain_missing(directory: Path, missing: list[str]) -> None:
    sharded = distributed.sharded_checkpoint_hint(directory)
    if sharded:
        raise distributed.ShardedCheckpointError(sharded)
    if CONFIG_NAME in missing and (directory / PEFT_CONFIG_NAME).is_file():
        raise AdapterFormatError(
            f"{str(directory)!r} holds a PEFT LoRA adapter ({PEFT_CONFIG_NAME} + "
            f"{PEFT_WEIGHTS_NAME}, as paca.export_lora writes), not a PaCA adapter: load it "
            f"with peft.PeftModel.from_pretrained(base_model, {str(directory)!r})"
        )
    present = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    holds = f"it holds {', '.join(present[:8])}" + (" ..." if len(present) > 8 else "")
    if not present:
        holds = "it is empty"
    hint = ""
    if "config.json" in present and {"model.safetensors", "pytorch_model.bin"} & set(present):
        hint = " (a full model: load it with transformers' from_pretrained)"
    raise FileNotFoundError(
        f"no PaCA adapter in {str(directory)!r}: missing {', '.join(missing)} ({holds}){hint}; "
        f"a PaCA adapter is the folder model.save_pretrained writes"
    )


def _redo(name: str) -> str:
    return f"restore {name} from a copy of this adapter, or save the adapter again"


def _read_config(shown: Path, real: Path) -> dict[str, Any]:
    try:
        raw = real.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise AdapterFileError(f"{shown} cannot be read: {e.strerror or e}", shown) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterFileError(
            f"{shown} is not a UTF-8 text file, so not the JSON config save_pretrained writes: "
            f"it is damaged; {_redo(shown.name)}",
            shown,
        ) from e
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        what = "it is empty" if not text.strip() else f"{e.msg} at line {e.lineno} column {e.colno}"
        if text.strip() and not text.rstrip().endswith("}"):
            what += "; the file looks cut off"
        raise AdapterFileError(
            f"{shown} is not valid JSON ({what}): the adapter config is damaged; "
            f"{_redo(shown.name)}",
            shown,
        ) from e
    if not isinstance(meta, dict):
        raise AdapterFileError(
            f"{shown} holds a JSON {type(meta).__name__}, not a PaCA adapter config (an "
            f"object with format_version, config, modules and fingerprint); {_redo(shown.name)}",
            shown,
        )
    version = meta.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{shown} has adapter format version {version!r}; this paca reads version "
            f"{FORMAT_VERSION}. Upgrade paca to load it.",
            shown,
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{shown} has format_version {version!r}, which no paca writes (this one writes "
            f"{FORMAT_VERSION}): the file was edited or is not a PaCA adapter config; "
            f"{_redo(shown.name)}",
            shown,
        )
    return meta


def _read_weights(shown: Path, real: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(real), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError: truncated, empty, or not safetensors at all
        raise AdapterFileError(
            f"{shown} is not a readable safetensors file ({e}): it is truncated or damaged; "
            f"{_redo(shown.name)}",
            shown,
        ) from e
    return metadata, tensors


def _differences(now: Any, saved: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON values (``where``: dotted key path)."""
    if isinstance(now, dict) and isinstance(saved, dict):
        out = []
        for key in sorted(set(now) | set(saved), key=str):
            at = f"{where}.{key}" if where else str(key)
            if key not in now:
                out.append(f"{at!r} was removed")
            elif key not in saved:
                out.append(f"{at!r} was added")
            else:
                out.extend(_differences(now[key], saved[key], at))
        return out
    if now != saved:

        def short(v: Any) -> str:
            s = json.dumps(v, sort_keys=True)
            return s if len(s) <= 40 else s[:37] + "..."

        return [f"{where!r} is {short(now)}, was {short(saved)}"]
    return []


def _diff_note(meta: dict[str, Any], metadata: dict[str, str]) -> str:
    try:
        saved = json.loads(metadata["paca_meta"])
    except (KeyError, ValueError):
        return ""
    body = {k: v for k, v in meta.items() if k != "fingerprint"}
    diff = _differences(body, saved)
    if not diff:
        return ""
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return f" ({'; '.join(diff[:3])}{more}, compared with the config saved with the weights)"


def _check_fingerprints(
    meta: dict[str, Any],
    metadata: dict[str, str],
    tensors: dict[str, torch.Tensor],
    config_path: Path,
    weights_path: Path,
) -> None:
    """Blame the right file when the config and the weights do not belong together."""
    in_config, in_weights = meta.get("fingerprint"), metadata["paca_fingerprint"]
    body = {k: v for k, v in meta.items() if k != "fingerprint"}
    if in_config == in_weights == _fingerprint(tensors, body):
        return
    recorded = metadata.get("paca_tensors_sha256")
    if recorded is not None and _hashes(tensors, body)[1] != recorded:
        raise AdapterFileError(
            f"{weights_path} is damaged or was modified after saving: its tensors do not match "
            f"the checksum recorded in it; {_redo(weights_path.name)}",
            weights_path,
        )
    if in_config != in_weights:
        raise AdapterFileError(
            f"{config_path} and {weights_path.name} come from different saves (an interrupted "
            f"or mixed copy, or an edited fingerprint?){_diff_note(meta, metadata)}; copy both "
            f"files from one save, or save the adapter again",
            config_path.parent,
        )
    if recorded is not None:  # the tensors are as saved: the config was changed
        raise AdapterFileError(
            f"{config_path} was edited after saving{_diff_note(meta, metadata)}: it no longer "
            f"matches the fingerprint recorded with {weights_path.name}. The config must "
            f"describe the saved tensors exactly, so it cannot be edited by hand; "
            f"{_redo(config_path.name)}",
            config_path,
        )
    raise AdapterFileError(  # an older save, without the checksum that tells which file
        f"{config_path} or {weights_path.name} was modified after saving (their contents no "
        f"longer match their fingerprint); restore both from a copy of this adapter, or save "
        f"the adapter again",
        config_path.parent,
    )


def _records(value: Any, fields: dict[str, type]) -> bool:
    """Whether ``value`` is an object of records, each with ``fields`` of these types."""
    return isinstance(value, dict) and all(
        isinstance(rec, dict) and all(isinstance(rec.get(k), t) for k, t in fields.items())
        for rec in value.values()
    )


def _check_structure(meta: dict[str, Any], config_path: Path) -> None:
    """The fields loading uses have the types save_pretrained writes."""
    problems = []
    if not isinstance(meta.get("config"), dict):
        problems.append('"config" is not an object')
    if not _records(meta.get("modules"), {"type": str, "weight_shape": list}):
        problems.append('"modules" is not an object of {"type", "weight_shape", "r"} records')
    if not _records(meta.get("modules_to_save", {}), {"type": str, "tensors": dict}):
        problems.append('"modules_to_save" is not an object of {"type", "tensors"} records')
    if problems:
        raise AdapterFileError(
            f"{config_path} is not a valid PaCA adapter config: {'; '.join(problems)}; "
            f"{_redo(config_path.name)}",
            config_path,
        )


def _config_of(saved: _Saved) -> PacaConfig:
    try:
        return PacaConfig.from_dict(saved.meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterFileError(
            f"{saved.config_path} holds a PacaConfig this paca cannot use ({e}); save the "
            f"adapter again with this paca version",
            saved.config_path,
        ) from e


#: Layer types whose adapters fit each other: a dense ``nn.Linear`` and a bitsandbytes 4-bit
#: ``Linear4bit`` of the same ``(out, in)`` (train on the 4-bit base, load onto the dense one).
_LINEAR_TYPES = {
    "torch.nn.modules.linear.Linear",
    "bitsandbytes.nn.modules.Linear4bit",
    "bitsandbytes.nn.modules.LinearNF4",
}


def _linear_like(kind: str) -> bool:
    return kind in _LINEAR_TYPES


def _check_model(view: nn.Module, meta: dict[str, Any], config: PacaConfig) -> None:
    """Refuse a model whose target modules or their shapes differ from the saved ones."""
    modules = dict(view.named_modules())
    saved: dict[str, dict[str, Any]] = meta["modules"]
    problems = []
    for path, rec in saved.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"module {path!r} does not exist in this model")
            continue
        kind = type_name(module)
        shape = list(getattr(getattr(module, "weight", None), "shape", []))
        if _linear_like(kind) and _linear_like(rec["type"]):  # dense and 4-bit interchange
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            shape = [int(n) for n in state.shape] if state is not None else shape
            saved_shape = rec.get("shape_oi", rec["weight_shape"])
            kind, rec = rec["type"], {**rec, "weight_shape": saved_shape}
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
        kind = type_name(module)
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
            f"the saved adapter (base model {_base_class(meta)}) does not fit this "
            f"model: " + "; ".join(problems[:10])
        )


def _base_class(meta: dict[str, Any]) -> Any:
    base = meta.get("base_model")
    return base.get("class") if isinstance(base, dict) else None


def _check_keys(saved: _Saved) -> None:
    meta, tensors = saved.meta, saved.tensors
    expected = {f"{p}.{s}" for p in meta["modules"] for s in ("delta", "idx")}
    for path, rec in meta.get("modules_to_save", {}).items():
        expected |= {f"{path}.{SAVED_MODULE_INFIX}.{k}" for k in rec["tensors"]}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterMismatchError(
            f"saved adapter tensors do not match its config: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]} ({saved.weights_path.name} against "
            f"{saved.config_path})"
        )


def _indices(saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {p: tensors[f"{p}.idx"].tolist() for p in saved}


def _copy_deltas(model: PacaModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
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
        if not torch.equal(idx.cpu(), src_idx):
            raise AdapterMismatchError(
                f"module {path!r}: the saved adapter trains other columns than adapter "
                f"{adapter_name!r} of this model; load it as a new adapter instead"
            )
        shape = distributed.full_shape(delta)  # sharded deltas: the full shape
        if tuple(src.shape) != shape:
            raise AdapterMismatchError(
                f"module {path!r}: saved delta has shape {tuple(src.shape)}, this model's "
                f"has {shape}" + distributed.shard_shape_hint(tuple(src.shape), shape)
            )
        distributed.copy_full_into(delta, src)  # into this rank's shard when sharded
    for _, _, src, dst in copies:
        distributed.copy_full_into(dst, src)


class SavedAdapter(NamedTuple):
    """A saved adapter, read and checked against a model (:func:`read_for_loading`)."""

    config: PacaConfig  #: as saved (what ``paca_configs`` records after loading)
    exact: PacaConfig  #: the saved config with the saved indices: adding it reproduces them
    tensors: dict[str, torch.Tensor]


def read_for_loading(view: nn.Module, directory: str | Path) -> SavedAdapter:
    """Read the adapter saved in ``directory`` and check that it fits ``view``, the model
    as :func:`paca.targets.base_view` shows it: the same target modules, types and shapes.

    Loading is this, then adding an adapter with :attr:`SavedAdapter.exact` (to a
    :class:`PacaModel`, or by wrapping a plain model), then :func:`fill_adapter`.
    """
    found = _read(directory)
    config = _config_of(found)
    _check_keys(found)
    _check_model(view, found.meta, config)
    exact = dataclasses.replace(config, indices=_indices(found.meta["modules"], found.tensors))
    return SavedAdapter(config, exact, found.tensors)


def fill_adapter(
    model: PacaModel, adapter_name: str, saved: SavedAdapter, is_trainable: bool = False
) -> None:
    """Copy the saved tensors into adapter ``adapter_name`` of ``model`` (just added with
    ``saved.exact``), record the config as saved, and freeze it unless ``is_trainable``."""
    model.paca_configs[adapter_name] = saved.config  # the indices live in the layers
    _copy_deltas(model, adapter_name, saved.tensors)
    _set_trainable(model, adapter_name, is_trainable)


def load_adapter(
    model: PacaModel, directory: str | Path, adapter_name: str, is_trainable: bool = False
) -> None:
    """Add the adapter saved in ``directory`` to ``model`` as ``adapter_name``."""
    if adapter_name in model.paca_configs:
        raise ValueError(
            f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first "
            f"or load under another name"
        )
    saved = read_for_loading(base_view(model.model), directory)
    model.add_adapter(adapter_name, saved.exact)
    fill_adapter(model, adapter_name, saved, is_trainable)


def load_adapter_weights(model: PacaModel, directory: str | Path, adapter_name: str) -> None:
    """Overwrite the deltas of existing adapter ``adapter_name`` (e.g. to resume training);
    the saved adapter must cover the same modules and columns."""
    found = _read(directory)
    meta, tensors = found.meta, found.tensors
    saved = meta["modules"]
    _check_keys(found)
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
    _copy_deltas(model, adapter_name, tensors)


def _set_trainable(model: PacaModel, adapter_name: str, trainable: bool) -> None:
    for _, layer in model.paca_layers():
        if adapter_name in layer.paca_delta:
            layer.paca_delta[adapter_name].requires_grad_(
                trainable and model.active_adapter == adapter_name
            )
    for _, copy in _saved_copies(model, adapter_name):
        for p in copy.parameters():
            p.requires_grad_(trainable and model.active_adapter == adapter_name)
