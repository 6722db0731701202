"""Wrapping a model with PaCA: find target layers, replace them, freeze the rest.

:func:`wrap` returns a :class:`PacaModel`, an ``nn.Module`` that forwards calls
and unknown attributes to the wrapped model (so ``generate``, ``config`` and a
``Trainer`` keep working) and adds the adapter operations.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paca.backend_abc import Backend
from paca.config import ALL_LINEAR, PacaConfig
from paca.layer import PacaLayer, layer_class_for, unsupported_reason
from paca.modules_to_save import COPIES, ORIGINAL, ModulesToSaveWrapper
from paca.selection import (
    gradient_scores,
    select_columns,
    strategy_needs_calibration,
    validate_indices,
)

logger = logging.getLogger("paca")

DEFAULT_ADAPTER = "default"


class TargetModulesNotFoundError(ValueError):
    """``target_modules`` matched no module of the model."""


def _matches(name: str, pattern: list[str] | str | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of output-embedding layers, which ``all-linear`` leaves alone (as PEFT does)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        with contextlib.suppress(Exception):
            out = get_out()
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def find_targets(model: nn.Module, config: PacaConfig) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs the config adapts, with clear errors."""
    heads = _output_head_names(model) if config.target_modules == ALL_LINEAR else set()
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, PacaLayer) or _inside_paca(name, model):
            continue
        if _matches(name, config.exclude_modules):
            continue
        if config.target_modules == ALL_LINEAR:
            cls = layer_class_for(module)
            if name not in heads and cls is not None and cls.linear_like:
                found.append((name, module))
            continue
        if _matches(name, config.target_modules):
            if layer_class_for(module) is None:
                if isinstance(config.target_modules, str) or _has_supported_children(module):
                    continue  # a regex or a container match; adaptable layers match on their own
                raise TypeError(
                    f"target module {name!r} is a {type(module).__module__}."
                    f"{type(module).__qualname__}, which PaCA cannot adapt: "
                    f"{unsupported_reason(module)}. Remove it from target_modules or "
                    f"add it to exclude_modules."
                )
            found.append((name, module))
    if not found:
        raise TargetModulesNotFoundError(_not_found_message(model, config))
    if isinstance(config.target_modules, list):
        unmatched = [
            t for t in config.target_modules if not any(_matches(n, [t]) for n, _ in found)
        ]
        if unmatched:
            warnings.warn(
                f"target_modules entries {unmatched} matched no module of "
                f"{type(model).__name__} (the others did); check their spelling. "
                f"{_close_names_hint(model, unmatched)}",
                UserWarning,
                stacklevel=3,
            )
    return found


def _close_names_hint(model: nn.Module, wanted: list[str]) -> str:
    leaves = sorted(
        {n.split(".")[-1] for n, m in model.named_modules() if n and layer_class_for(m)}
    )
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaves, n=3)})
    return (
        f"Did you mean: {', '.join(close)}?"
        if close
        else f"Adaptable names: {', '.join(leaves[:40])}."
    )


def _has_supported_children(module: nn.Module) -> bool:
    return any(layer_class_for(m) is not None for m in module.modules() if m is not module)


def _inside_paca(name: str, model: nn.Module) -> bool:
    return _is_internal(name)


#: child names of PaCA layers and modules_to_save wrappers that are not model modules.
_INTERNAL_PARTS = {"base_layer", ORIGINAL, COPIES}


def _is_internal(name: str) -> bool:
    """Whether ``name`` lies inside a PaCA layer or a modules_to_save wrapper."""
    return any(
        part.startswith(("paca_", "base_layer")) or part in _INTERNAL_PARTS
        for part in name.split(".")
    )


class ModulesToSaveError(ValueError):
    """``modules_to_save`` names no module, or a module PaCA also adapts."""


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
        if name and not _is_internal(name) and _matches(name, wanted)
    ]
    unmatched = [w for w in wanted if not any(_matches(n, [w]) for n in matched)]
    if unmatched:
        names = sorted({n for n, _ in model.named_modules() if n and not _is_internal(n)})
        leaves = sorted({n.split(".")[-1] for n in names})
        close = sorted(
            {c for w in unmatched for c in difflib.get_close_matches(w, leaves + names, n=3)}
        )
        hint = (
            f"Did you mean: {', '.join(close)}?" if close else f"Names: {', '.join(leaves[:40])}."
        )
        raise ModulesToSaveError(
            f"modules_to_save entries {unmatched} match no module of {type(model).__name__}. {hint}"
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


def _not_found_message(model: nn.Module, config: PacaConfig) -> str:
    leaves = sorted(
        {n.split(".")[-1] for n, m in model.named_modules() if n and layer_class_for(m)}
    )
    wanted = config.target_modules
    hint = ""
    if isinstance(wanted, list):
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaves, n=3)})
        if close:
            hint = f" Did you mean: {', '.join(close)}?"
    return (
        f"target_modules={wanted!r} matched no adaptable module of {type(model).__name__}."
        f"{hint} Adaptable layer names in this model: {', '.join(leaves[:40]) or 'none'}."
    )


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _call_wrapped(self: PacaModel, *args: Any, **kwargs: Any) -> Any:
    return self.model(*args, **kwargs)


class _ForwardingForward:
    """``PacaModel.forward``: calls the wrapped model. On an instance it carries the wrapped
    model's signature (``__wrapped__``), so tools that inspect ``model.forward``
    (transformers' Trainer keeps only dataset columns the forward names) see the real
    arguments instead of ``*args, **kwargs``."""

    def __get__(self, obj: PacaModel | None, objtype: type | None = None) -> Callable[..., Any]:
        if obj is None:
            return _call_wrapped
        model = obj.model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return model(*args, **kwargs)

        inner = getattr(model, "forward", None)
        if inner is not None:
            functools.update_wrapper(forward, inner, updated=())
        return forward


class PacaModel(nn.Module):
    """A model whose target layers carry PaCA adapters. Create it with :func:`wrap`."""

    def __init__(
        self,
        model: nn.Module,
        config: PacaConfig,
        backend: Backend,
        adapter_name: str = DEFAULT_ADAPTER,
        *,
        calibration: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, PacaModel) or any(isinstance(m, PacaLayer) for m in model.modules()):
            raise ValueError(
                "this model is already wrapped with PaCA; add another adapter with "
                "PacaModel.add_adapter(name, config) instead of wrapping it again"
            )
        self.model = model
        self.paca_configs: dict[str, PacaConfig] = {}
        self.active_adapter = adapter_name
        self._backend = backend
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config, calibration=calibration, loss_fn=loss_fn)
        except BaseException:
            for p, was in frozen:  # leave the user's model as it was
                p.requires_grad_(was)
            raise

    # --- attribute forwarding (like PeftModel) --------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    forward = _ForwardingForward()

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its PaCA layers in place), as PEFT's ``get_base_model``."""
        return self.model

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    # --- gradient checkpointing (transformers models) ------------------------------
    def enable_input_require_grads(self) -> None:
        """Make the input-embedding output require grad, so that reentrant checkpointing
        still back-propagates into the PaCA layers although the embeddings are frozen."""
        fn = getattr(self.model, "enable_input_require_grads", None)
        if callable(fn):
            fn()
            return
        get_in = getattr(self.model, "get_input_embeddings", None)
        emb = get_in() if callable(get_in) else None
        if emb is None:
            raise ValueError(
                f"{type(self.model).__name__} has no get_input_embeddings(); make the first "
                f"checkpointed segment's input require grad yourself or use use_reentrant=False"
            )

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            out.requires_grad_(True)

        self._input_grad_hook = emb.register_forward_hook(hook)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Turn on the wrapped model's activation checkpointing and make checkpointed
        segments see inputs that require grad (frozen embeddings otherwise cut the graph
        under reentrant checkpointing)."""
        self._enable_checkpointing("activation_checkpointing_enable", args, kwargs)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Older name of :meth:`activation_checkpointing_enable` (transformers < 5)."""
        self._enable_checkpointing("gradient_checkpointing_enable", args, kwargs)

    def _enable_checkpointing(self, method: str, args: Any, kwargs: dict[str, Any]) -> None:
        fn = getattr(self.model, method, None)
        if not callable(fn):
            raise AttributeError(
                f"{type(self.model).__name__} has no {method}(); wrap its blocks with "
                f"torch.utils.checkpoint yourself"
            )
        fn(*args, **kwargs)
        self.enable_input_require_grads()

    # --- save / load ------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | Path, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """Write the adapter (``adapter_model.safetensors`` + ``paca_config.json``) atomically.

        Only deltas and indices are written, never base weights. With ``adapter_name=None``
        the active adapter goes to ``save_directory`` and every other adapter to
        ``save_directory/<name>/``. transformers' extra keyword arguments are accepted
        (``state_dict``: deltas are taken from it when it holds them;
        ``is_main_process=False``: write nothing); see :func:`paca.io.save_adapter`.
        """
        from paca.io import save_pretrained

        save_pretrained(self, save_directory, adapter_name, **kwargs)

    def load_adapter(
        self, directory: str | Path, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Add the adapter saved in ``directory`` as ``adapter_name`` (see :func:`paca.load`)."""
        from paca.io import load_adapter

        load_adapter(self, directory, adapter_name, is_trainable=is_trainable)

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def config(self) -> Any:
        """The wrapped model's own config (transformers), if any."""
        return getattr(self.model, "config", None)

    @property
    def paca_config(self) -> PacaConfig:
        return self.paca_configs[self.active_adapter]

    def paca_layers(self) -> Iterator[tuple[str, PacaLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, PacaLayer):
                yield name, module

    # --- adapters ---------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        config: PacaConfig,
        *,
        calibration: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        """Add adapter ``name`` to the layers ``config`` targets (it becomes trainable).

        ``calibration`` (batches) and ``loss_fn`` feed strategies that look at gradients
        (``selection="gradient"``). On any error the model is left as it was.
        """
        if name in self.paca_configs:
            raise ValueError(f"adapter {name!r} already exists; pick another name")
        targets = find_targets(self._unwrapped_view(), config)
        given = dict(config.indices or {})
        unknown = sorted(set(given) - {n for n, _ in targets})
        if unknown:
            raise ValueError(
                f"PacaConfig.indices names modules that are not targets: {unknown}; "
                f"targets are: {[n for n, _ in targets][:20]}"
            )
        to_save = find_modules_to_save(self._unwrapped_view(), config, [n for n, _ in targets])
        self._check_no_overlap([n for n, _ in targets], to_save)
        created: list[tuple[str, PacaLayer]] = []
        layers: dict[str, PacaLayer] = {}
        wrapped: list[tuple[str, ModulesToSaveWrapper]] = []
        try:
            for mod_name, module in targets:
                layer = self._existing_layer(mod_name)
                if layer is None:
                    cls = layer_class_for(module)
                    assert cls is not None
                    layer = cls(module, self._backend)
                    _set_submodule(self.model, mod_name, layer)
                    created.append((mod_name, layer))
                layers[mod_name] = layer
            scores: dict[str, torch.Tensor] = {}
            pending = [n for n in layers if n not in given]
            if pending and strategy_needs_calibration(config.selection):
                if calibration is None:
                    raise ValueError(
                        f"selection={config.selection!r} needs calibration batches: pass "
                        f"calibration=[batch, ...] (and loss_fn= if the model output has no "
                        f".loss) to paca.wrap or PacaModel.add_adapter"
                    )
                scores = gradient_scores(
                    self.model, {n: layers[n] for n in pending}, calibration, loss_fn
                )
            for mod_name, layer in layers.items():
                n = layer.in_features
                if mod_name in given:
                    idx = validate_indices(given[mod_name], n, mod_name)
                else:
                    extra = {"scores": scores[mod_name]} if mod_name in scores else {}
                    idx = select_columns(
                        config.selection,
                        mod_name,
                        layer,
                        config.r,
                        config.seed,
                        n,
                        **config.selection_options,
                        **extra,
                    )
                layer.add_adapter(name, idx, config.delta_dtype)
            for mod_name in to_save:
                wrapper = self.model.get_submodule(mod_name)
                if not isinstance(wrapper, ModulesToSaveWrapper):
                    wrapper = ModulesToSaveWrapper(wrapper)
                    _set_submodule(self.model, mod_name, wrapper)
                wrapped.append((mod_name, wrapper))
                wrapper.add_adapter(name)
        except BaseException:
            for layer in layers.values():
                if name in layer.paca_delta:
                    layer.delete_adapter(name)
            for mod_name, layer in created:
                _set_submodule(self.model, mod_name, layer.base_layer)
            for mod_name, wrapper in wrapped:
                if name in wrapper.modules_to_save:
                    wrapper.delete_adapter(name)
                if not len(wrapper.modules_to_save):
                    _set_submodule(self.model, mod_name, wrapper.original_module)
            raise
        self.paca_configs[name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.paca_configs else name)
        logger.info("PaCA adapter %r added to %d layers", name, len(targets))

    def _check_no_overlap(self, targets: list[str], to_save: list[str]) -> None:
        """Refuse modules_to_save on PaCA layers of other adapters and targets that other
        adapters train in full (the current adapter's overlap is found by matching)."""
        for mod_name in targets:
            if isinstance(self.model.get_submodule(mod_name), ModulesToSaveWrapper):
                raise ModulesToSaveError(
                    f"module {mod_name!r} is in modules_to_save of adapter(s) "
                    f"{sorted(self.model.get_submodule(mod_name).modules_to_save)}; it cannot "
                    f"also be a PaCA target. Exclude it (exclude_modules)."
                )
        adapted = [n for n, _ in self.paca_layers()]
        for mod_name in to_save:
            clash = [n for n in adapted if n == mod_name or n.startswith(mod_name + ".")]
            if clash:
                raise ModulesToSaveError(
                    f"module {mod_name!r} is in modules_to_save but PaCA already adapts "
                    f"{clash[:5]} (another adapter's targets); a module is either adapted or "
                    f"trained in full"
                )

    def modules_to_save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """``(qualified name, wrapper)`` of every module trained in full by some adapter."""
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _unwrapped_view(self) -> nn.Module:
        """The model as target matching should see it: PaCA layers as their base layers."""
        return _BaseView(self.model)

    def _existing_layer(self, name: str) -> PacaLayer | None:
        with contextlib.suppress(AttributeError):
            module = self.model.get_submodule(name)
            if isinstance(module, PacaLayer):
                return module
        return None

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active (and only trainable) adapter."""
        if name not in self.paca_configs:
            raise KeyError(f"no adapter {name!r}; adapters: {sorted(self.paca_configs)}")
        self.active_adapter = name
        for _, layer in self.paca_layers():
            layer.active_adapter = name if name in layer.paca_delta else None
            for adapter, delta in layer.paca_delta.items():
                delta.requires_grad_(adapter == name)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        if name not in self.paca_configs:
            raise KeyError(f"no adapter {name!r}; adapters: {sorted(self.paca_configs)}")
        if len(self.paca_configs) == 1:
            raise ValueError(
                f"adapter {name!r} is the only one; use unload() to get the base model back, "
                f"or add another adapter first"
            )
        for _, layer in self.paca_layers():
            if name in layer.paca_delta:
                layer.delete_adapter(name)
        for mod_name, wrapper in list(self.modules_to_save_wrappers()):
            if name in wrapper.modules_to_save:
                wrapper.delete_adapter(name)
                if not len(wrapper.modules_to_save):  # no adapter trains it any more
                    _set_submodule(self.model, mod_name, wrapper.original_module)
        del self.paca_configs[name]
        if self.active_adapter == name and self.paca_configs:
            self.set_adapter(next(iter(self.paca_configs)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the pretrained model: every PaCA layer computes with its base layer only."""
        layers = [layer for _, layer in self.paca_layers()]
        previous = [layer.disabled for layer in layers]
        merged = [layer for layer in layers if layer.merged_adapters]
        if merged:
            raise RuntimeError(
                "cannot disable adapters while some are merged into the base weights; "
                "call unmerge() first"
            )
        wrappers = [w for _, w in self.modules_to_save_wrappers()]
        previous_w = [w.disabled for w in wrappers]
        for layer in layers:
            layer.disabled = True
        for wrapper in wrappers:
            wrapper.disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous, strict=True):
                layer.disabled = was
            for wrapper, was in zip(wrappers, previous_w, strict=True):
                wrapper.disabled = was

    # --- merge / unload -----------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights (fp32 arithmetic, exact unmerge)."""
        names = adapter_names or [self.active_adapter]
        layers = [layer for _, layer in self.paca_layers()]
        if safe_merge:  # check every layer before touching any weight
            for name in names:
                for mod_name, layer in self.paca_layers():
                    if name in layer.paca_delta:
                        delta = layer.paca_delta[name]
                        if not torch.isfinite(delta).all():
                            raise ValueError(
                                f"refusing to merge adapter {name!r}: module {mod_name!r} has "
                                f"NaN/Inf in its delta; no weight was changed"
                            )
        for name in names:
            for layer in layers:
                if name in layer.paca_delta:
                    layer.merge(name, safe=safe_merge)

    def unmerge(self) -> None:
        for _, layer in self.paca_layers():
            layer.unmerge()

    def _replace_layers(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge)
        for name, layer in list(self.paca_layers()):
            if not merge:
                layer.unmerge()
            _set_submodule(self.model, name, layer.base_layer)
        for name, wrapper in list(self.modules_to_save_wrappers()):
            copies = wrapper.modules_to_save
            keep = (
                copies[self.active_adapter]
                if merge and self.active_adapter in copies
                else wrapper.original_module
            )
            _set_submodule(self.model, name, keep)
        model = self.model
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """The base model with the active adapter merged in, and no PaCA layers left; modules
        in the adapter's ``modules_to_save`` are replaced by its trained copies."""
        return self._replace_layers(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """The base model with its original weights and modules (bit-exact), no PaCA layers."""
        return self._replace_layers(merge=False)

    # --- reporting ---------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def to_backend(self, backend: Backend | str) -> PacaModel:
        """Compute with another backend, moving the model to its device."""
        from paca._registry import registry

        b = registry().instance(backend) if isinstance(backend, str) else backend
        self._backend = b
        for _, layer in self.paca_layers():
            layer.set_backend(b)
        self.to(b.device())
        return self


class _BaseView(nn.Module):
    """Presents a model with PaCA layers shown as their base layers (for re-targeting)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", model)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        for name, module in self._wrapped.named_modules():
            if isinstance(module, PacaLayer):
                yield name, module.base_layer
            elif isinstance(module, ModulesToSaveWrapper):
                yield name, module.original_module
            elif _is_internal(name):
                continue
            else:
                yield name, module

    def get_output_embeddings(self) -> Any:
        get_out = getattr(self._wrapped, "get_output_embeddings", None)
        return get_out() if callable(get_out) else None


def wrap(
    model: nn.Module,
    config: PacaConfig | None = None,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    backend: Backend | str | None = None,
    move_to_device: bool = True,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> PacaModel:
    """Add a PaCA adapter to ``model`` and freeze everything but its deltas.

    Args:
        model: any ``nn.Module`` (a transformers model or a plain torch module).
        config: which layers and how many columns; ``PacaConfig()`` if omitted.
        adapter_name: name of this adapter (several can live on one model).
        backend: backend object or name; the selected one (:func:`paca.get_backend`)
            if omitted.
        move_to_device: move the model to the backend's device.
        calibration: batches for ``selection="gradient"`` (dicts are passed as keyword
            arguments, tuples/lists as positional ones, anything else as one argument).
        loss_fn: ``loss_fn(output, batch) -> loss`` for calibration; default ``output.loss``.
    """
    from paca._registry import registry

    reg = registry()
    b = reg.instance(backend) if isinstance(backend, str) else (backend or reg.current())
    if move_to_device:
        model = model.to(b.device())
    return PacaModel(
        model, config or PacaConfig(), b, adapter_name, calibration=calibration, loss_fn=loss_fn
    )
