"""Random-init tiny models built from configs, so nothing is downloaded.

Each architecture exercises a different layer type PaCA has to handle:
``tiny_llama`` uses ``nn.Linear`` (with grouped-query attention, so k/v projections
are narrower than q), ``tiny_gpt2`` uses transformers' ``Conv1D`` (weight stored
transposed), and ``tiny_vit`` has an ``nn.Conv2d`` patch embedding. Builders are
seeded and leave the global RNG untouched, so the same arguments give the same
weights everywhere.

The causal LMs are initialised with std ``TINY_INIT_STD`` (0.1) rather than
transformers' 0.02. With 0.02 the frozen random LM head, after the final norm,
can only produce logits of about +-1.3, so any method that freezes the head and
embeddings (PaCA, LoRA) plateaus near loss 4.5 on the built-in data; with 0.1 the
same PaCA run reaches ~1.4 in 200 steps, and full fine-tuning still works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # model classes are imported on first build: keeps `import paca.tiny` light
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

from .pretrained import PRETRAINED, pretrained_builder
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

#: Attention kernel used unless a caller asks otherwise. "sdpa" is supported by all
#: three architectures on transformers 4.55 and 5.x (and on Gaudi); set explicitly so a
#: change of library default cannot change results. At this size it is as fast as "eager".
DEFAULT_ATTN = "sdpa"
#: Weight-init std of the tiny causal LMs (see the module docstring for why not 0.02).
TINY_INIT_STD = 0.1


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
    init_std: float = TINY_INIT_STD,
    attn_implementation: str = DEFAULT_ATTN,
) -> LlamaConfig:
    """Config for a tiny LLaMA; token ids default to the byte tokenizer's specials."""
    from transformers import LlamaConfig

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
        initializer_range=init_std,
        attn_implementation=attn_implementation,
    )


def gpt2_config(
    vocab_size: int = VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 256,
    init_std: float = TINY_INIT_STD,
    attn_implementation: str = DEFAULT_ATTN,
) -> GPT2Config:
    """Config for a tiny GPT-2 with dropout off (deterministic training steps)."""
    from transformers import GPT2Config

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
        initializer_range=init_std,
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
    init_std: float = 0.02,
    attn_implementation: str = DEFAULT_ATTN,
) -> ViTConfig:
    """Config for a tiny ViT image classifier (``intermediate`` defaults to 4 * hidden)."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate if intermediate is not None else 4 * hidden,
        num_labels=num_labels,
        initializer_range=init_std,
        attn_implementation=attn_implementation,
    )


def build_from_config(cls: type[PreTrainedModel], config: PretrainedConfig, seed: int = 0) -> Any:
    """Instantiate ``cls(config)`` with weights drawn from ``seed``, in eval mode.

    The global torch RNG is saved and restored, so building a model never shifts the
    random stream of the caller (e.g. data shuffling in a test).
    """
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
    init_std: float = TINY_INIT_STD,
    attn_implementation: str = DEFAULT_ATTN,
) -> LlamaForCausalLM:
    """Tiny LLaMA (``nn.Linear`` q/k/v/o and gate/up/down projections, GQA), eval mode."""
    config = llama_config(
        vocab_size=vocab_size,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_positions=max_positions,
        init_std=init_std,
        attn_implementation=attn_implementation,
    )
    from transformers import LlamaForCausalLM

    return build_from_config(LlamaForCausalLM, config, seed)


def tiny_gpt2(
    vocab_size: int = VOCAB_SIZE,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    init_std: float = TINY_INIT_STD,
    attn_implementation: str = DEFAULT_ATTN,
) -> GPT2LMHeadModel:
    """Tiny GPT-2 (transformers ``Conv1D`` c_attn/c_proj/c_fc; tied LM head), eval mode."""
    config = gpt2_config(
        vocab_size=vocab_size,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_positions=max_positions,
        init_std=init_std,
        attn_implementation=attn_implementation,
    )
    from transformers import GPT2LMHeadModel

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
    init_std: float = 0.02,
    attn_implementation: str = DEFAULT_ATTN,
) -> ViTForImageClassification:
    """Tiny ViT classifier (``nn.Conv2d`` patch embedding, ``nn.Linear`` attention/MLP)."""
    config = vit_config(
        image_size=image_size,
        patch=patch,
        num_labels=num_labels,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        channels=channels,
        init_std=init_std,
        attn_implementation=attn_implementation,
    )
    from transformers import ViTForImageClassification

    return build_from_config(ViTForImageClassification, config, seed)


#: Random-init builders by the name an experiment file uses, e.g. ``"paca.tiny/tiny-llama"``.
RANDOM_INIT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "tiny-vit": tiny_vit,
}
#: Every builder by name: the random-init ones and the shipped pretrained checkpoints
#: (``digits-cnn``, ``digits-vit``, ``code-llama``; see :mod:`paca.tiny.pretrained`).
TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    **RANDOM_INIT_MODELS,
    **{name: pretrained_builder(name) for name in PRETRAINED},
}
#: The names of :data:`TINY_MODELS` that are image classifiers (the rest are causal LMs).
IMAGE_MODELS = frozenset({"tiny-vit", "digits-cnn", "digits-vit"})


def build_tiny(name: str, **overrides: Any) -> nn.Module:
    """Build the tiny model registered as ``name``; ``overrides`` go to its builder."""
    try:
        builder = TINY_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(TINY_MODELS))
        raise ValueError(f"unknown tiny model {name!r}; known: {known}") from None
    return builder(**overrides)
