"""Random-init tiny models built from configs, so nothing is downloaded.

Each architecture exercises a different layer type PaCA has to handle:
``tiny_llama`` uses ``nn.Linear`` (with grouped-query attention, so k/v projections
are narrower than q), ``tiny_gpt2`` uses transformers' ``Conv1D`` (weight stored
transposed), and ``tiny_vit`` has an ``nn.Conv2d`` patch embedding. Builders are
seeded and leave the global RNG untouched, so the same arguments give the same
weights everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

#: Attention kernel used unless a caller asks otherwise. "sdpa" is supported by all
#: three architectures on transformers 4.55 and 5.x and is faster than "eager" on CPU.
DEFAULT_ATTN = "sdpa"


def _special_ids(vocab_size: int) -> dict[str, int | None]:
    """The byte tokenizer's pad/bos/eos ids, dropped if a smaller vocab can't hold them."""
    ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    return {key: (i if i < vocab_size else None) for key, i in ids.items()}


def llama_config(
    vocab_size: int = VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 176,
    max_positions: int = 256,
    attn_implementation: str = DEFAULT_ATTN,
) -> LlamaConfig:
    """Config for a tiny LLaMA; token ids default to the byte tokenizer's specials."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        **_special_ids(vocab_size),
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def gpt2_config(
    vocab_size: int = VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 256,
    attn_implementation: str = DEFAULT_ATTN,
) -> GPT2Config:
    """Config for a tiny GPT-2 with dropout off (deterministic training steps)."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=intermediate,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_special_ids(vocab_size),
        attn_implementation=attn_implementation,
    )


def vit_config(
    image_size: int = 32,
    patch: int = 8,
    num_labels: int = 10,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    channels: int = 3,
    attn_implementation: str = DEFAULT_ATTN,
) -> ViTConfig:
    """Config for a tiny ViT image classifier (``intermediate`` defaults to 4 * hidden)."""
    return ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate if intermediate is not None else 4 * hidden,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )


def build_from_config(cls: type[PreTrainedModel], config: PretrainedConfig, seed: int = 0) -> Any:
    """Instantiate ``cls(config)`` with weights drawn from ``seed``; global RNG is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.train(False)


def tiny_llama(
    vocab_size: int = VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 176,
    max_positions: int = 256,
    seed: int = 0,
    attn_implementation: str = DEFAULT_ATTN,
) -> LlamaForCausalLM:
    """Tiny LLaMA (``nn.Linear`` q/k/v/o and gate/up/down projections, GQA)."""
    config = llama_config(
        vocab_size,
        hidden,
        layers,
        heads,
        kv_heads,
        intermediate,
        max_positions,
        attn_implementation,
    )
    return build_from_config(LlamaForCausalLM, config, seed)


def tiny_gpt2(
    vocab_size: int = VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    attn_implementation: str = DEFAULT_ATTN,
) -> GPT2LMHeadModel:
    """Tiny GPT-2 (transformers ``Conv1D`` c_attn/c_proj/c_fc; tied LM head)."""
    config = gpt2_config(
        vocab_size, hidden, layers, heads, intermediate, max_positions, attn_implementation
    )
    return build_from_config(GPT2LMHeadModel, config, seed)


def tiny_vit(
    image_size: int = 32,
    patch: int = 8,
    num_labels: int = 10,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    channels: int = 3,
    seed: int = 0,
    attn_implementation: str = DEFAULT_ATTN,
) -> ViTForImageClassification:
    """Tiny ViT classifier (``nn.Conv2d`` patch embedding, ``nn.Linear`` attention/MLP)."""
    config = vit_config(
        image_size, patch, num_labels, hidden, layers, heads, intermediate, channels,
        attn_implementation,
    )  # fmt: skip
    return build_from_config(ViTForImageClassification, config, seed)


#: Builders by the name an experiment file uses, e.g. ``model = "tiny-llama"``.
TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "tiny-vit": tiny_vit,
}


def build_tiny(name: str, **overrides: Any) -> nn.Module:
    """Build the tiny model registered as ``name``; ``overrides`` go to its builder."""
    try:
        builder = TINY_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(TINY_MODELS))
        raise ValueError(f"unknown tiny model {name!r}; known: {known}") from None
    return builder(**overrides)
