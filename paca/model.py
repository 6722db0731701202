"""Wrapping a model with PaCA: find target layers, replace them, freeze the rest.

:func:`wrap` returns a :class:`PacaModel`, an ``nn.Module`` that forwards calls
and unknown attributes to the wrapped model (so ``generate``, ``config`` and a
``Trainer`` keep working) and adds the adapter operations: adding, switching,
deleting, merging and unloading adapters. :func:`load` wraps a model with a saved
adapter.

Which modules a config adapts is :mod:`paca.targets`; names and hints are
:mod:`paca.names`; tied-weight checks are :mod:`paca.tied_weights`; the files are
:mod:`paca.io`. Their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paca import io
from paca.backend_abc import Backend
from paca.config import PacaConfig, PacaConfigError
from paca.layer import MergeStep, PacaLayer, layer_class_for
from paca.modules_to_save import ModulesToSaveWrapper
from paca.names import (
    DEFAULT_ADAPTER,
    UnknownAdapterError,
    check_adapter_name,
    display_name,
    set_submodule,
    unknown_adapter,
)
from paca.selection import (
    STRATEGIES,
    gradient_scores,
    select_columns,
    strategy_needs_calibration,
    validate_indices,
)
from paca.targets import (
    ModulesToSaveError,
    TargetModulesNotFoundError,
    base_view,
    find_modules_to_save,
    find_targets,
)
from paca.tied_weights import TiedWeightsError, tied_weight_problems, tied_weights_error

logger = logging.getLogger("paca")

#: names defined in the modules split from this one, importable from here as before
__all__ = [
    "DEFAULT_ADAPTER",
    "MergeError",
    "ModulesToSaveError",
    "PacaModel",
    "TargetModulesNotFoundError",
    "TiedWeightsError",
    "TrainableOutsideAdapterError",
    "UnknownAdapterError",
    "check_adapter_name",
    "find_modules_to_save",
    "find_targets",
    "load",
    "tied_weight_problems",
    "wrap",
]


class MergeError(ValueError):
    """A merge was refused before anything was written; every base weight is untouched."""


class TrainableOutsideAdapterError(RuntimeError):
    """Parameters outside the adapter are trainable, so saving would silently drop them."""


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _config_type_error(config: object, expected: str) -> PacaConfigError:
    return PacaConfigError(
        f"config must be {expected}, got {type(config).__name__}"
        + (
            "; build one with paca.PacaConfig(**d) or PacaConfig.from_dict(d)"
            if isinstance(config, dict)
            else " (a PEFT LoraConfig? PaCA takes paca.PacaConfig(r=..., ...))"
        )
    )


def _check_loss_fn(loss_fn: object) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise PacaConfigError(
            f"loss_fn must be callable as loss_fn(output, batch) -> loss, got "
            f"{type(loss_fn).__name__}"
        )


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
        check_adapter_name(adapter_name)
        lazy = [
            n
            for n, p in model.named_parameters()
            if isinstance(p, nn.parameter.UninitializedParameter)
        ]
        if lazy:
            raise ValueError(
                f"{type(model).__name__} has uninitialized (lazy) parameters {lazy[:5]}: run "
                f"one forward pass with a sample batch before wrapping it with PaCA"
            )
        self.model = model
        self.paca_configs: dict[str, PacaConfig] = {}
        self.active_adapter = adapter_name
        self._backend = backend
        #: ``requires_grad`` of every parameter (by name) before wrapping: unload() and
        #: merge_and_unload() restore it exactly.
        self._requires_grad_before: dict[str, bool] = {
            n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)
        }
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
        """Write the adapter (``paca_adapter.safetensors`` + ``paca_config.json``) as one unit.

        Only deltas and indices are written, never base weights. With ``adapter_name=None``
        the active adapter goes to ``save_directory`` and every other adapter to
        ``save_directory/<name>/``. transformers' extra keyword arguments are accepted
        (``state_dict``: deltas are taken from it when it holds them;
        ``is_main_process=False``: write nothing); see :func:`paca.io.save_adapter`.

        Raises :class:`TrainableOutsideAdapterError` (writing nothing) when parameters
        outside the adapter are trainable (a bias the user unfroze): the adapter could not
        hold them, so saving would silently drop their training.
        """
        if kwargs.get("is_main_process", True):
            self.check_nothing_trainable_outside()
        io.save_pretrained(self, save_directory, adapter_name, **kwargs)

    def load_adapter(
        self, directory: str | Path, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Add the adapter saved in ``directory`` as ``adapter_name`` (see :func:`paca.load`)."""
        check_adapter_name(adapter_name)
        io.load_adapter(self, directory, adapter_name, is_trainable=is_trainable)

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
        check_adapter_name(name, "adapter name")
        if not isinstance(config, PacaConfig):
            raise _config_type_error(config, "a paca.PacaConfig")
        config.validate()
        if name in self.paca_configs:
            raise ValueError(f"adapter {name!r} already exists; pick another name")
        _check_loss_fn(loss_fn)
        targets = find_targets(base_view(self.model), config)
        given = dict(config.indices or {})
        unknown = sorted(set(given) - {n for n, _ in targets})
        if unknown:
            raise ValueError(
                f"PacaConfig.indices names modules that are not targets: {unknown}; "
                f"targets are: {[n for n, _ in targets][:20]}"
            )
        to_save = find_modules_to_save(base_view(self.model), config, [n for n, _ in targets])
        self._check_no_overlap([n for n, _ in targets], to_save)
        new_targets = [(n, m) for n, m in targets if self._existing_layer(n) is None]
        tied = tied_weight_problems(self.model, new_targets)
        if tied:
            raise tied_weights_error(tied, f"cannot add PaCA adapter {name!r}")
        self._check_selection(config, [(n, m) for n, m in targets if n not in given])
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
                    set_submodule(self.model, mod_name, layer)
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
                    set_submodule(self.model, mod_name, wrapper)
                wrapped.append((mod_name, wrapper))
                wrapper.add_adapter(name)
        except BaseException:
            for layer in layers.values():
                if name in layer.paca_delta:
                    layer.delete_adapter(name)
            for mod_name, layer in created:
                set_submodule(self.model, mod_name, layer.base_layer)
            for mod_name, wrapper in wrapped:
                if name in wrapper.modules_to_save:
                    wrapper.delete_adapter(name)
                if not len(wrapper.modules_to_save):
                    set_submodule(self.model, mod_name, wrapper.original_module)
            raise
        self.paca_configs[name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.paca_configs else name)
        logger.info("PaCA adapter %r added to %d layers", name, len(targets))

    @staticmethod
    def _check_selection(config: PacaConfig, pending: list[tuple[str, nn.Module]]) -> None:
        """Refuse an unknown strategy, or one that reads weights of a meta-device model,
        before any layer is replaced."""
        if not pending:
            return
        if config.selection not in STRATEGIES:
            raise ValueError(
                f"unknown PaCA selection strategy {config.selection!r} (PacaConfig.selection); "
                f"known: {', '.join(sorted(STRATEGIES))}"
            )
        if config.selection in {"weight_norm", "gradient"}:
            meta = [n for n, m in pending if any(p.is_meta for p in m.parameters())]
            if meta:
                raise ValueError(
                    f"selection={config.selection!r} reads the weights, but {meta[:5]} are on "
                    f"the meta device (no values): use selection='random' or explicit "
                    f"PacaConfig.indices, or materialize and load the model before wrapping"
                )

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

    def _existing_layer(self, name: str) -> PacaLayer | None:
        with contextlib.suppress(AttributeError):
            module = self.model.get_submodule(name)
            if isinstance(module, PacaLayer):
                return module
        return None

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active (and only trainable) adapter."""
        if not isinstance(name, str) or name not in self.paca_configs:
            raise unknown_adapter(name, self.paca_configs)
        self.active_adapter = name
        for _, layer in self.paca_layers():
            layer.active_adapter = name if name in layer.paca_delta else None
            for adapter, delta in layer.paca_delta.items():
                delta.requires_grad_(adapter == name)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        if not isinstance(name, str) or name not in self.paca_configs:
            raise unknown_adapter(name, self.paca_configs)
        if len(self.paca_configs) == 1:
            raise ValueError(
                f"adapter {name!r} is the only one; use unload() to get the base model back, "
                f"or add another adapter first"
            )
        merged = [n for n, layer in self.paca_layers() if name in layer.merged_adapters]
        if merged:
            raise ValueError(
                f"adapter {name!r} is merged into {merged[:5]}; unmerge() before deleting it"
            )
        for _, layer in self.paca_layers():
            if name in layer.paca_delta:
                layer.delete_adapter(name)
        for mod_name, wrapper in list(self.modules_to_save_wrappers()):
            if name in wrapper.modules_to_save:
                wrapper.delete_adapter(name)
                if not len(wrapper.modules_to_save):  # no adapter trains it any more
                    set_submodule(self.model, mod_name, wrapper.original_module)
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
    def _adapter_names(self, adapter_names: str | Iterable[str] | None) -> list[str]:
        if adapter_names is None:
            return [self.active_adapter]
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise ValueError(
                f"adapter_names is empty; name adapters to merge (this model has "
                f"{sorted(self.paca_configs)}) or pass None for the active one"
            )
        for n in names:
            if not isinstance(n, str) or n not in self.paca_configs:
                raise unknown_adapter(n, self.paca_configs)
        return list(dict.fromkeys(names))

    def merge(
        self, adapter_names: str | Iterable[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Merge adapters (default: the active one) into the base weights, all or nothing.

        Every layer's merged columns (fp32 add, one rounding to the weight's dtype) are
        computed before any weight is written; the merge is refused, with nothing written,
        when an adapter name is unknown, a target's weight is tied to another tensor, or
        (``safe_merge=True``) any merged column would be NaN/Inf *in the weight's dtype*
        (e.g. fp16 overflow). The error names every offending module. If a backend fails
        while writing, the layers already written are unmerged again before the error
        propagates. :meth:`unmerge` restores the base weights bit for bit.
        """
        names = self._adapter_names(adapter_names)
        plans: list[tuple[str, PacaLayer, list[MergeStep]]] = []
        failures: list[str] = []
        for mod_name, layer in self.paca_layers():
            wanted = [n for n in names if n in layer.paca_delta]
            if not wanted:
                continue
            try:
                steps = layer.plan_merge(wanted)
            except ValueError as e:
                failures.append(f"module {mod_name!r}: {e}")
                continue
            if safe_merge:
                for step in steps:
                    if not bool(torch.isfinite(step.merged).all()):
                        failures.append(
                            f"module {mod_name!r} (adapter {step.name!r}): the merged weight "
                            f"would contain NaN or Inf in {step.merged.dtype}"
                        )
            if steps:
                plans.append((mod_name, layer, steps))
        tied = tied_weight_problems(self.model, [(n, layer) for n, layer, _ in plans])
        if tied:
            raise tied_weights_error(
                tied, f"refusing to merge adapter(s) {names}; nothing was written"
            )
        if failures:
            raise MergeError(
                f"refusing to merge adapter(s) {names}: {len(failures)} problem(s); nothing "
                f"was written, every base weight is untouched:\n  - "
                + "\n  - ".join(failures)
                + (
                    "\nNaN/Inf: a diverged delta, or a merged value beyond the weight dtype's "
                    "range (fp16 max is 65504); keep the adapter unmerged, or merge into a "
                    "float32/bfloat16 copy of the model"
                    if safe_merge
                    else ""
                )
            )
        before = [(layer, len(layer.merged_adapters)) for _, layer, _ in plans]
        try:
            for _, layer, steps in plans:
                layer.apply_merge(steps)
        except BaseException:
            for layer, count in before:  # put back what was written, exactly
                layer.unmerge_to(count)
            raise

    def unmerge(self) -> None:
        for _, layer in self.paca_layers():
            layer.unmerge()

    def trainable_outside_adapters(self) -> list[str]:
        """Names of trainable parameters that no adapter owns (not a PaCA delta, not a
        ``modules_to_save`` copy), e.g. a bias the user unfroze: an adapter save would not
        contain them."""
        owned = {id(p) for _, layer in self.paca_layers() for p in layer.paca_delta.values()}
        for _, wrapper in self.modules_to_save_wrappers():
            owned.update(id(p) for p in wrapper.modules_to_save.parameters())
        return [
            n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in owned
        ]

    def check_nothing_trainable_outside(self, action: str = "save the adapter") -> None:
        """Raise :class:`TrainableOutsideAdapterError` if :meth:`trainable_outside_adapters`
        is not empty: their trained values would be silently dropped by ``action``."""
        names = self.trainable_outside_adapters()
        if not names:
            return
        modules = sorted({display_name(n.rpartition(".")[0]) or n for n in names})
        raise TrainableOutsideAdapterError(
            f"refusing to {action}: {len(names)} parameter(s) outside the PaCA adapter are "
            f"trainable and would not be saved with it: {[display_name(n) for n in names[:10]]}. "
            f"An adapter holds only PaCA deltas and modules_to_save copies. Either freeze "
            f"them (p.requires_grad_(False)) if you did not mean to train them, or train "
            f"those modules in full with PacaConfig(modules_to_save={modules[:5]}) so their "
            f"trained copies are saved with the adapter. Values already trained in place "
            f"live only in this in-memory base model."
        )

    def _restore_requires_grad(self, model: nn.Module) -> None:
        for n, p in model.named_parameters(remove_duplicate=False):
            was = self._requires_grad_before.get(n)
            if was is not None:
                p.requires_grad_(was)

    def _replace_layers(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        if merge:
            # 4-bit (QPaCA) layers cannot be merged into: they become dense layers holding
            # dequant(W) first, and go back to 4-bit if the merge is refused
            swapped = []
            for name, layer in list(self.paca_layers()):
                to_dense = getattr(layer, "dequantized_layer", None)
                if callable(to_dense):
                    set_submodule(self.model, name, to_dense())
                    swapped.append((name, layer))
            try:
                self.merge(safe_merge=safe_merge)
            except BaseException:
                for name, layer in swapped:
                    set_submodule(self.model, name, layer)
                raise
        untracked = self.trainable_outside_adapters()
        if untracked:
            warnings.warn(
                f"parameters outside the adapter were trainable: "
                f"{[display_name(n) for n in untracked[:10]]}; whatever training changed in them "
                f"stays in the returned model ({'merge_and_unload' if merge else 'unload'} "
                f"restores only what PaCA changed)",
                UserWarning,
                stacklevel=3,
            )
        for name, layer in list(self.paca_layers()):
            if not merge:
                layer.unmerge()
            set_submodule(self.model, name, layer.base_layer)
        for name, wrapper in list(self.modules_to_save_wrappers()):
            copies = wrapper.modules_to_save
            keep = (
                copies[self.active_adapter]
                if merge and self.active_adapter in copies
                else wrapper.original_module
            )
            set_submodule(self.model, name, keep)
        model = self.model
        self._restore_requires_grad(model)
        return model

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """The base model with the active adapter merged in, and no PaCA layers left; modules
        in the adapter's ``modules_to_save`` are replaced by its trained copies. The merge
        is all-or-nothing (see :meth:`merge`): on refusal the model stays wrapped and
        unchanged. Every parameter's ``requires_grad`` is restored to its value before
        ``wrap``. A 4-bit (QPaCA) layer is returned as a dense ``nn.Linear`` holding its
        dequantized weight with the adapter merged (in the dtype it was quantized from)."""
        return self._replace_layers(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """The base model with its original weights and modules (bit-exact), no PaCA layers,
        and every parameter's ``requires_grad`` as it was before ``wrap``."""
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
        b = _resolve_backend(backend, "to_backend(backend)")
        self._backend = b
        for _, layer in self.paca_layers():
            layer.set_backend(b)
        self.to(b.device())
        return self


def _resolve_backend(backend: object, what: str = "backend") -> Backend:
    """A backend object from a name, an instance or ``None`` (the selected backend)."""
    from paca._registry import registry

    if backend is None:
        return registry().current()
    if isinstance(backend, str):
        return registry().instance(backend)
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, type) and issubclass(backend, Backend):
        raise PacaConfigError(
            f"{what} is the class {backend.__name__}, not an instance; pass its name "
            f"(backend={getattr(backend, 'name', '?')!r}) or an instance ({backend.__name__}())"
        )
    raise PacaConfigError(
        f"{what} must be a backend name such as 'cpu' or 'cuda', a paca.Backend instance, or "
        f"None for the selected backend; got {type(backend).__name__} {backend!r:.60}. "
        f"paca.list_backends() shows what is installed."
    )


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

    Every argument is checked before the model is touched; a wrong type or value raises
    :class:`paca.config.PacaConfigError` naming the argument.

    Args:
        model: any ``nn.Module`` (a transformers model or a plain torch module).
        config: which layers and how many columns; ``PacaConfig()`` if omitted.
        adapter_name: name of this adapter, a Python identifier (several can live on one
            model).
        backend: backend object or name; the selected one (:func:`paca.get_backend`)
            if omitted.
        move_to_device: move the model to the backend's device. A model on the meta
            device is never moved (it has no values to move): materialize it afterwards
            with ``to_empty(device=...)``; the column indices survive that.
        calibration: batches for ``selection="gradient"`` (dicts are passed as keyword
            arguments, tuples/lists as positional ones, anything else as one argument).
        loss_fn: ``loss_fn(output, batch) -> loss`` for calibration; default ``output.loss``.

    Target layers whose weight is tied to another tensor (GPT-2's ``lm_head`` and input
    embedding) are refused with :class:`TiedWeightsError`, and quantized layers that no
    registered layer type accepts with a ``TypeError`` naming them.
    """
    if not isinstance(model, nn.Module):
        raise PacaConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, PacaConfig):
        raise _config_type_error(config, "a paca.PacaConfig or None")
    config = (config or PacaConfig()).validate()
    check_adapter_name(adapter_name)
    if not isinstance(move_to_device, bool):
        raise PacaConfigError(f"move_to_device must be True or False, got {move_to_device!r}")
    _check_loss_fn(loss_fn)
    if calibration is not None and (
        isinstance(calibration, (str, bytes, torch.Tensor, dict))
        or not isinstance(calibration, Iterable)
    ):
        raise PacaConfigError(
            f"calibration must be an iterable of batches (e.g. [batch1, batch2] or a "
            f"DataLoader), got {type(calibration).__name__}; wrap a single batch in a list"
        )
    b = _resolve_backend(backend)
    if move_to_device and not _is_meta(model):
        model = model.to(b.device())
    return PacaModel(model, config, b, adapter_name, calibration=calibration, loss_fn=loss_fn)


def load(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    backend: Backend | str | None = None,
    is_trainable: bool = False,
) -> PacaModel:
    """Wrap ``model`` with the adapter saved in ``directory`` (from ``save_pretrained``).

    The saved indices are used as they are (no strategy runs). Missing or unexpected
    tensors, other target modules or other weight shapes are errors. With
    ``is_trainable=False`` the deltas are frozen and the model is put in eval mode.
    A :class:`PacaModel` gets the adapter added (:meth:`PacaModel.load_adapter`).
    """
    if isinstance(model, PacaModel):
        model.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return model
    saved = io.read_for_loading(base_view(model), directory)  # as PacaModel.load_adapter
    paca_model = wrap(model, saved.exact, adapter_name=adapter_name, backend=backend)
    io.fill_adapter(paca_model, adapter_name, saved, is_trainable)
    if not is_trainable:
        paca_model.eval()
    return paca_model
