"""Target matching: which modules of a model a :class:`~paca.config.PacaConfig` adapts
(``target_modules`` / ``exclude_modules``) and which it trains in full
(``modules_to_save``), with errors that name the modules and suggest close names.

Wrapping (:mod:`paca.model`) and loading (:mod:`paca.io`) both match here, on
:func:`base_view` of the model: a model that already carries PaCA layers or
modules_to_save wrappers is matched as the user's original model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from paca.config import ALL_LINEAR, PacaConfig
from paca.layer import PacaLayer, is_quantized_module, layer_class_for, unsupported_reason
from paca.modules_to_save import ModulesToSaveWrapper
from paca.names import did_you_mean, is_internal, matches, output_head_names, type_name


class TargetModulesNotFoundError(ValueError):
    """``target_modules`` matched no module of the model."""


class ModulesToSaveError(ValueError):
    """``modules_to_save`` names no module, or a module PaCA also adapts."""


class BaseView(nn.Module):
    """Presents a model with PaCA layers shown as their base layers and modules_to_save
    wrappers as their original modules (for matching a config against it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", model)

    @property
    def wrapped(self) -> nn.Module:
        """The model this view presents."""
        return self.__dict__["_wrapped"]

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        for name, module in self.wrapped.named_modules():
            if isinstance(module, PacaLayer):
                yield name, module.base_layer
            elif isinstance(module, ModulesToSaveWrapper):
                yield name, module.original_module
            elif is_internal(name):
                continue
            else:
                yield name, module

    def get_output_embeddings(self) -> Any:
        get_out = getattr(self.wrapped, "get_output_embeddings", None)
        return get_out() if callable(get_out) else None


def base_view(model: nn.Module) -> nn.Module:
    """``model`` as target matching sees it: PaCA layers as their base layers,
    modules_to_save wrappers as their original modules, PaCA internals left out. Pass
    the wrapped model (``PacaModel.model``) or a plain one; nothing is copied."""
    return BaseView(model)


def _model_name(model: nn.Module) -> str:
    return type(model.wrapped if isinstance(model, BaseView) else model).__name__


def adaptable_leaf_names(model: nn.Module) -> list[str]:
    """The last name parts of the modules some registered layer type adapts, sorted."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if n and layer_class_for(m)})


def _has_supported_children(module: nn.Module) -> bool:
    return any(layer_class_for(m) is not None for m in module.modules() if m is not module)


def find_targets(model: nn.Module, config: PacaConfig) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs the config adapts, with clear errors."""
    heads = output_head_names(model) if config.target_modules == ALL_LINEAR else set()
    found: list[tuple[str, nn.Module]] = []
    # matched quantized layers no registered layer type accepts
    quantized: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, PacaLayer) or is_internal(name):
            continue
        if matches(name, config.exclude_modules):
            continue
        if config.target_modules == ALL_LINEAR:
            cls = layer_class_for(module)
            if name not in heads and cls is not None and cls.linear_like:
                found.append((name, module))
            elif name not in heads and cls is None and is_quantized_module(module):
                quantized.append((name, module))
            continue
        if matches(name, config.target_modules):
            if layer_class_for(module) is None:
                if isinstance(config.target_modules, str) and is_quantized_module(module):
                    quantized.append((name, module))
                    continue
                if isinstance(config.target_modules, str) or _has_supported_children(module):
                    continue  # a regex or a container match; adaptable layers match on their own
                raise TypeError(
                    f"target module {name!r} is a {type_name(module)}, which PaCA cannot adapt: "
                    f"{unsupported_reason(module)}. Remove it from target_modules or "
                    f"add it to exclude_modules."
                )
            found.append((name, module))
    if quantized:
        first = quantized[0][1]
        raise TypeError(
            f"target_modules={config.target_modules!r} matches {len(quantized)} quantized "
            f"layer(s) that PaCA cannot adapt, e.g. {[n for n, _ in quantized[:5]]} "
            f"({type_name(first)}): "
            f"{unsupported_reason(first)}. To adapt only the other layers, add them to "
            f"exclude_modules."
        )
    if not found:
        raise TargetModulesNotFoundError(_not_found_message(model, config))
    if isinstance(config.target_modules, list):
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [  # a target that matched only excluded modules was meant
            t for t in config.target_modules if not any(matches(n, [t]) for n in names)
        ]
        if unmatched:
            leaves = adaptable_leaf_names(model)
            hint = did_you_mean(unmatched, leaves) or (
                f"Adaptable names: {', '.join(leaves[:40])}."
            )
            warnings.warn(
                f"target_modules entries {unmatched} matched no module of "
                f"{_model_name(model)} (the others did); check their spelling. {hint}",
                UserWarning,
                stacklevel=3,
            )
    return found


def _not_found_message(model: nn.Module, config: PacaConfig) -> str:
    leaves = adaptable_leaf_names(model)
    wanted = config.target_modules
    hint = did_you_mean(wanted, leaves) if isinstance(wanted, list) else ""
    return (
        f"target_modules={wanted!r} matched no adaptable module of {_model_name(model)}."
        f"{' ' + hint if hint else ''} Adaptable layer names in this model: "
        f"{', '.join(leaves[:40]) or 'none'}."
    )


def find_modules_to_save(model: nn.Module, config: PacaConfig, targets: Iterable[str]) -> list[str]:
    """Qualified names of the modules ``config.modules_to_save`` names (outermost matches).

    Names match like list-form ``target_modules``. A name matching nothing, or a module
    that is (or contains) one of ``targets``, is a :class:`ModulesToSaveError`.
    """
    wanted = config.modules_to_save or []
    if not wanted:
        return []
    matched = [
        name
        for name, _ in model.named_modules()
        if name and not is_internal(name) and matches(name, wanted)
    ]
    unmatched = [w for w in wanted if not any(matches(n, [w]) for n in matched)]
    if unmatched:
        names = sorted({n for n, _ in model.named_modules() if n and not is_internal(n)})
        leaves = sorted({n.split(".")[-1] for n in names})
        hint = did_you_mean(unmatched, leaves + names) or f"Names: {', '.join(leaves[:40])}."
        raise ModulesToSaveError(
            f"modules_to_save entries {unmatched} match no module of {_model_name(model)}. {hint}"
        )
    found = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
    targets = list(targets)
    for name in found:
        clash = [t for t in targets if t == name or t.startswith(name + ".")]
        if clash:
            what = "is" if clash == [name] else f"contains {clash[:5]}, which are"
            raise ModulesToSaveError(
                f"module {name!r} is in modules_to_save but {what} also a PaCA target: a module "
                f"is either adapted or trained in full. Remove it from target_modules (or add "
                f"it to exclude_modules) or from modules_to_save."
            )
    return found
