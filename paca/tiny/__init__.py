"""Tiny models (random-init and small shipped pretrained ones), an offline byte tokenizer
and generated data.

Everything here is built locally from configs, code and the checkpoints shipped in
``paca/tiny/checkpoints`` (no model hub, no network), so tests, the default ``paca run``
job and benchmarks run anywhere. This package
depends only on torch, transformers and tokenizers, not on the rest of :mod:`paca`.
"""

from __future__ import annotations

from .data import (
    FACTS,
    TASKS,
    WORDS,
    builtin_instructions_path,
    format_example,
    format_prompt,
    image_dataset,
    instruction_dataset,
    load_jsonl,
    save_jsonl,
    tokenize_for_clm,
)
from .models import (
    DEFAULT_ATTN,
    IMAGE_MODELS,
    RANDOM_INIT_MODELS,
    TINY_INIT_STD,
    TINY_MODELS,
    build_from_config,
    build_tiny,
    gpt2_config,
    llama_config,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
    vit_config,
)
from .pretrained import (
    PRETRAINED,
    CheckpointMismatchError,
    DigitsCNN,
    checkpoint_paths,
    checkpoint_record,
    digits_cnn,
    load_pretrained,
)
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer

__all__ = [
    "BOS_ID",
    "DEFAULT_ATTN",
    "EOS_ID",
    "FACTS",
    "IMAGE_MODELS",
    "PAD_ID",
    "PRETRAINED",
    "RANDOM_INIT_MODELS",
    "TASKS",
    "TINY_INIT_STD",
    "TINY_MODELS",
    "VOCAB_SIZE",
    "WORDS",
    "build_from_config",
    "CheckpointMismatchError",
    "DigitsCNN",
    "build_tiny",
    "builtin_instructions_path",
    "byte_tokenizer",
    "checkpoint_paths",
    "checkpoint_record",
    "digits_cnn",
    "format_example",
    "format_prompt",
    "gpt2_config",
    "image_dataset",
    "instruction_dataset",
    "llama_config",
    "load_jsonl",
    "load_pretrained",
    "save_jsonl",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_vit",
    "tokenize_for_clm",
    "vit_config",
]
