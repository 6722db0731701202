"""The four methods compared, built from identical base weights.

* ``paca``: :func:`paca.wrap` with ``r`` columns on the target layers.
* ``lora``: PEFT LoRA with the same ``r`` and targets (dropout 0, so PEFT uses an
  identity and saves no dropout mask: LoRA's most memory-friendly setting).
* ``full``: every weight trained.
* ``frozen``: every weight frozen, gradients flow to the input embeddings. Nothing is
  learned; it is the cost of backpropagating through the network at all, which no
  adapter can go below.
"""

from __future__ import annotations

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
    "lora": "PEFT LoRA, same r and targets, dropout 0",
    "full": "full fine-tuning, all weights trained",
    "frozen": "frozen base, grads to input embeddings only (lower bound)",
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


def build_base(config: BenchConfig) -> nn.Module:
    """The random-init LLaMA-style base model (same weights for every ``seed``)."""
    from transformers import LlamaForCausalLM

    from paca.tiny import VOCAB_SIZE, build_from_config, llama_config

    cfg = llama_config(
        vocab_size=config.vocab_size or VOCAB_SIZE,
        hidden=config.hidden,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        intermediate=config.intermediate,
        max_positions=max(config.seq_search_max, max(config.probe_lengths())),
    )
    model = build_from_config(LlamaForCausalLM, cfg, seed=config.seed)
    return model.to(torch_dtype(config.dtype))


def _target_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """Outermost modules whose last name part is a target (adapter wrappers, not bases)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return found


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr) if params else None


def _inputs_require_grad(model: nn.Module) -> None:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


def build_method(name: str, config: BenchConfig, backend: Backend) -> MethodSetup:
    """Build ``name`` on ``backend``'s device from a fresh copy of the base weights."""
    model = build_base(config)
    device = backend.device()
    if name == "paca":
        from paca import PacaConfig, wrap

        pcfg = PacaConfig(r=config.r, target_modules=list(config.targets), seed=config.seed)
        model = wrap(model, pcfg, backend=backend)
    elif name == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is a declared dependency
            raise RuntimeError(
                "the LoRA baseline needs PEFT: pip install peft, or leave 'lora' out of --methods"
            ) from exc
        lcfg = LoraConfig(
            r=config.r,
            lora_alpha=2 * config.r,
            lora_dropout=0.0,
            target_modules=list(config.targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model.to(device), lcfg)
    elif name == "full":
        model.requires_grad_(True)
    elif name == "frozen":
        model.requires_grad_(False)
        _inputs_require_grad(model)
    else:
        raise ValueError(f"unknown benchmark method {name!r}")
    model = model.to(device)
    model.train()
    trainable, total = _count(model)
    return MethodSetup(
        name=name,
        model=model,
        optimizer=_optimizer(model, config.lr),
        trainable_params=trainable,
        total_params=total,
        target_layers=_target_layers(model, config.targets),
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
