"""The methods compared, built from identical base weights, by one builder.

* ``paca``: :func:`paca.wrap` with ``r`` columns on the target layers.
* ``lora``: PEFT LoRA with the same ``r`` and targets, ``lora_alpha = r`` unless an
  ``alpha`` is given (scaling 1: the LoRA update is as large as the learning rate makes
  it, as PaCA's is; alpha only sets the scalar LoRA multiplies its output by, so it does
  not change what a step costs) and dropout 0 unless given (PEFT then uses an identity
  and saves no dropout mask: LoRA's most memory-friendly setting).
* ``full``: every weight trained.
* ``frozen``: every weight frozen. ``paca bench`` (:func:`build_method`) also makes the
  gradients flow to the input (the embeddings' output for a transformers model): nothing
  is learned; it is the cost of backpropagating through the network at all, which no
  adapter can go below.
* ``qpaca`` / ``qlora``: the base's linear layers (all but the head) in 4-bit NF4
  (:func:`paca.quantize_nf4`), then ``paca`` / ``lora``.

:func:`apply_method` is the one builder: ``paca run`` applies it to the experiment's
model (:func:`paca.experiment.methods.prepare`, with the ``[method]`` section's options),
``paca bench`` to a LLaMA-style model (:func:`build_method`) and the CUDA
micro-benchmark (``python -m paca_cuda.bench``) to a stack of ``nn.Linear`` layers, so
all three compare the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paca.backend_abc import Backend
from paca.bench.config import BenchConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: How each method is described in reports.
DESCRIPTIONS = {
    "paca": "PaCA (paca.wrap), r columns per target layer",
    "lora": "PEFT LoRA, same r and targets, alpha = r, dropout 0",
    "full": "full fine-tuning, all weights trained",
    "frozen": "frozen base, grads to input embeddings only (lower bound)",
    "qpaca": "QPaCA: NF4 base (paca.quantize_nf4, double quant) + paca.wrap, same r and targets",
    "qlora": "QLoRA: the same NF4 layers + PEFT LoRA (its bitsandbytes layers), alpha = r",
}


@dataclass
class MethodSetup:
    """A model ready to train with one method, and what it trains."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable_params: int
    total_params: int
    target_layers: dict[str, nn.Module]


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def lora_config(
    r: int,
    targets: Sequence[str] | str,
    task_type: str | None = None,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    exclude: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> Any:
    """The PEFT ``LoraConfig`` of the LoRA method (alpha = r and dropout 0 by default)."""
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is in the bench and test extras
        raise ImportError(
            "method 'lora' (and 'qlora') needs PEFT: pip install peft (or paca[bench])"
        ) from None
    options: dict[str, Any] = {}
    if exclude:  # LoraConfig has exclude_modules from PEFT 0.14 on
        options["exclude_modules"] = _names(exclude)
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha else r,
        lora_dropout=dropout,
        target_modules=_names(targets),
        modules_to_save=list(modules_to_save or []) or None,
        task_type=task_type,
        **options,
    )


def _names(names: Sequence[str] | str | None) -> list[str] | str | None:
    """A list of module names, or a string (a regex or ``"all-linear"``) as it is."""
    return names if names is None or isinstance(names, str) else list(names)


def inputs_require_grad(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so backward reaches layer 0."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def apply_method(
    name: str,
    model: nn.Module,
    *,
    r: int,
    targets: Sequence[str] | str,
    backend: Backend,
    seed: int = 0,
    move_to_device: bool = True,
    alpha: float | None = None,
    dropout: float = 0.0,
    exclude: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    selection: str = "random",
    task_type: str | None = "auto",
) -> nn.Module:
    """``model`` prepared for method ``name`` (see the module docstring), in training mode.

    ``r``, ``targets``, ``exclude`` and ``modules_to_save`` mean the same for PaCA and
    LoRA; ``seed`` and ``selection`` choose PaCA's columns; ``alpha`` and ``dropout`` are
    LoRA's (alpha: r when None or 0). ``task_type``: PEFT's; ``"auto"`` is ``CAUSAL_LM``
    for a model with input embeddings. The model ends up on ``backend``'s device unless
    ``move_to_device`` is False (the CUDA micro-benchmark runs the CUDA backend's code on
    CPU tensors in its smoke mode). Errors of :func:`paca.wrap` (e.g.
    :class:`paca.ModulesToSaveError`) pass through.
    """
    device = backend.device()
    if name in ("qpaca", "qlora"):  # every linear but the head to NF4, then PaCA / LoRA
        from paca.layers_quant import quantize_nf4

        model = quantize_nf4(model, device=device if move_to_device else None)
        name = name[1:]
    if name == "paca":
        from paca import PacaConfig, wrap

        pcfg = PacaConfig(
            r=r,
            target_modules=_names(targets),
            exclude_modules=_names(exclude) or None,
            seed=seed,
            selection=selection,
            modules_to_save=list(modules_to_save or []) or None,
        )
        model = wrap(model, pcfg, backend=backend, move_to_device=move_to_device)
    elif name == "lora":
        from peft import get_peft_model

        if task_type == "auto":
            task_type = "CAUSAL_LM" if hasattr(model, "get_input_embeddings") else None
        cfg = lora_config(
            r,
            targets,
            task_type,
            alpha=alpha,
            dropout=dropout,
            exclude=exclude,
            modules_to_save=modules_to_save,
        )
        model = get_peft_model(model.to(device) if move_to_device else model, cfg)
    elif name == "full":
        model.requires_grad_(True)
    elif name == "frozen":
        model.requires_grad_(False)
    else:
        raise ValueError(f"unknown benchmark method {name!r}")
    if move_to_device:
        model = model.to(device)
    model.train()
    return model


def base_config(config: BenchConfig) -> Any:
    """The ``LlamaConfig`` of the benchmarked base model (shape from ``config``)."""
    from paca.tiny import VOCAB_SIZE, llama_config

    return llama_config(
        vocab_size=config.vocab_size or VOCAB_SIZE,
        hidden=config.hidden,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        intermediate=config.intermediate,
        max_positions=max(config.seq_search_max, max(config.probe_lengths())),
    )


def build_base(config: BenchConfig) -> nn.Module:
    """The random-init LLaMA-style base model (same weights for every ``seed``)."""
    from transformers import LlamaForCausalLM

    from paca.tiny import build_from_config

    model = build_from_config(LlamaForCausalLM, base_config(config), seed=config.seed)
    return model.to(torch_dtype(config.dtype))


def target_layers(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Outermost modules whose last name part is a target (adapter wrappers, not bases)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return found


def adapted_weight_bytes(layers: dict[str, nn.Module]) -> int:
    """Bytes of the base weights of ``layers`` (the weights an adapter adapts)."""
    total = 0
    for module in layers.values():
        base = getattr(module, "base_layer", module)
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor):
            total += weight.numel() * weight.element_size()
    return total


def _numel(p: torch.Tensor) -> int:
    """Logical parameter count: a packed 4-bit weight counts its ``out×in`` values."""
    state = getattr(p, "quant_state", None)
    return int(state.shape[0]) * int(state.shape[1]) if state is not None else p.numel()


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the whole model as stored: parameters, buffers and 4-bit quantization state
    (scales and codes, which bitsandbytes keeps outside parameters and buffers)."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
    seen: dict[int, int] = {}
    for t in tensors:
        seen[int(t.untyped_storage().data_ptr()) or id(t)] = int(t.untyped_storage().nbytes())
    return sum(seen.values())


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters (None when nothing trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr) if params else None


def build_method(name: str, config: BenchConfig, backend: Backend) -> MethodSetup:
    """Build ``name`` on ``backend``'s device from a fresh copy of the base weights."""
    model = apply_method(
        name,
        build_base(config),
        r=config.r,
        targets=config.targets,
        backend=backend,
        seed=config.seed,
    )
    if name == "frozen" and hasattr(model, "get_input_embeddings"):
        inputs_require_grad(model)  # the lower bound still backpropagates to the input
    trainable, total = _count(model)
    return MethodSetup(
        name=name,
        model=model,
        optimizer=make_optimizer(model, config.lr),
        trainable_params=trainable,
        total_params=total,
        target_layers=target_layers(model, config.targets),
    )


def make_batch(config: BenchConfig, seq: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids of shape (batch, seq)."""
    vocab = config.vocab_size
    if vocab is None:
        from paca.tiny import VOCAB_SIZE

        vocab = VOCAB_SIZE
    gen = torch.Generator().manual_seed(config.seed + seq)
    return torch.randint(0, vocab, (config.batch, seq), generator=gen).to(device)


def train_step(setup: MethodSetup, input_ids: torch.Tensor) -> float:
    """One training step: forward with loss, backward, optimizer step. Returns the loss."""
    opt = setup.optimizer
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    out = setup.model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    if opt is not None:
        opt.step()
    return float(out.loss.detach())
