"""Tied weights: a target layer whose weight is shared with another tensor or module.

Merging into such a weight would write the adapter into the others too, and a weight
transformers re-ties on load would silently lose a merged change, so wrapping and merging
refuse them (:class:`TiedWeightsError`) naming every place the weight is shared.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from paca.layers_base import PacaLayer
from paca.names import display_name


class TiedWeightsError(ValueError):
    """A target layer's weight is shared with another module (tied weights)."""


def _extent(t: torch.Tensor) -> tuple[Any, ...] | None:
    """``(device, storage pointer, first byte, end byte)`` of a tensor's memory."""
    if t.is_meta or t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None
    size = t.element_size()
    start = t.storage_offset() * size
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return (str(t.device), ptr, start, start + span * size)


def _overlap(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    return a is not None and b is not None and a[2] < b[3] and b[2] < a[3]


def _transformers_ties(model: nn.Module) -> dict[str, str]:
    """``{tensor name: why}`` for tensors transformers ties (``_tied_weights_keys`` of a
    model whose config says ``tie_word_embeddings=True``); it re-ties them on load."""
    out: dict[str, str] = {}
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        cfg = getattr(module, "config", None)
        if not keys or cfg is None:
            continue
        tie = getattr(cfg, "tie_word_embeddings", None)
        if tie is None:
            with contextlib.suppress(Exception):
                tie = cfg.get_text_config(decoder=True).tie_word_embeddings
        if not tie:
            continue
        pairs = keys.items() if isinstance(keys, dict) else ((k, None) for k in keys)
        for key, source in pairs:
            full = f"{prefix}.{key}" if prefix else str(key)
            out[full] = (
                f"transformers ties it to {source!r}" if source else "transformers ties it"
            ) + " (config.tie_word_embeddings=True) and re-ties it when the model is loaded"
    return out


def tied_weight_problems(model: nn.Module, targets: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Why each of ``targets`` (``(name, module)``; PaCA layers count as their base layer)
    shares its weight with something else: another module's tensor in the same memory, the
    same module object under another parent, or a transformers weight tie."""
    # every tensor slot (module, attribute) of the model, indexed by memory and identity
    Holder = tuple[str, nn.Module, str, Any]  # (name, module, attribute, memory extent)
    by_memory: dict[tuple[Any, ...], list[Holder]] = {}
    by_identity: dict[int, list[Holder]] = {}
    parents: dict[int, set[tuple[int, str]]] = {}
    names: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(mod_name)
        for attr, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), set()).add((id(module), attr))
        for attr, t in itertools.chain(module._parameters.items(), module._buffers.items()):
            if isinstance(t, torch.Tensor):
                ext = _extent(t)
                holder = (f"{mod_name}.{attr}" if mod_name else attr, module, attr, ext)
                by_identity.setdefault(id(t), []).append(holder)
                if ext is not None:
                    by_memory.setdefault(ext[:2], []).append(holder)
    ties = _transformers_ties(model)
    problems: list[str] = []
    for name, module in targets:
        if isinstance(module, PacaLayer):
            module = module.base_layer
        shown = display_name(name)
        fix_untie = (
            f"Either leave it out (remove it from target_modules or add {shown!r} to "
            f"exclude_modules), or untie it first: model.{shown}.weight = "
            f"torch.nn.Parameter(model.{shown}.weight.detach().clone())"
        )
        places = sorted({display_name(n) for n in names.get(id(module), [])})
        if len(parents.get(id(module), ())) > 1:
            problems.append(
                f"module {shown!r} is the same module object as {[p for p in places if p != shown]} "
                f"(one layer used in several places); PaCA would adapt it in one place only, "
                f"and a merge would change the others. Leave it out (exclude_modules) or give "
                f"each place its own copy"
            )
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        ext = _extent(weight)
        candidates = list(by_identity.get(id(weight), []))
        if ext is not None:
            candidates += [h for h in by_memory.get(ext[:2], []) if _overlap(ext, h[3])]
        shared = sorted(
            {
                display_name(h_name)
                for h_name, h_mod, h_attr, _ in candidates
                if not (h_mod is module and h_attr == "weight")
            }
        )
        if shared:
            problems.append(
                f"module {shown!r}: its weight shares memory with {shared} (tied weights); "
                f"merging would write the adapter into those too. {fix_untie}"
                + (" and set model.config.tie_word_embeddings = False" if ties else "")
            )
            continue
        why = ties.get(f"{display_name(name)}.weight")
        if why is not None:
            problems.append(
                f"module {shown!r}: {why}, so a merged or saved model would silently lose the "
                f"change. {fix_untie} and set model.config.tie_word_embeddings = False"
            )
    return problems


def tied_weights_error(problems: list[str], action: str) -> TiedWeightsError:
    """One error listing :func:`tied_weight_problems`, for ``action`` (what was refused)."""
    return TiedWeightsError(
        f"{action}: {len(problems)} target module(s) have tied weights:\n  - "
        + "\n  - ".join(problems)
    )
