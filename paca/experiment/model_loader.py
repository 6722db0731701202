"""Load the model an experiment names: a built-in tiny model, a local folder, or a hub id.

Errors say exactly what was looked for (the built-in names, the local path, the hub id),
so a typo or a missing download is obvious.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paca.experiment.schema import ExperimentError, ModelSection

logger = logging.getLogger("paca.experiment")

TINY_PREFIX = "paca.tiny/"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """The model named in an experiment is neither built in, nor local, nor loadable."""


@dataclass
class LoadedModel:
    """A model ready to fine-tune, with what turns raw examples into its inputs."""

    model: nn.Module
    task: str  # "causal-lm" or "image-classification"
    tokenizer: Any = None  # causal-lm
    image_processor: Any = None  # image-classification (None for tiny ViT: raw tensors)
    source: str = ""  # "builtin", "local" or "hub"
    image_size: int = 0
    num_labels: int = 0


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _dtype(section: ModelSection) -> torch.dtype:
    return _TORCH_DTYPES.get(section.dtype, torch.float32)


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56 (``torch_dtype``,
    its old name, is deprecated there); 4.55, which optimum-habana pins, knows only
    ``torch_dtype`` and passes an unknown ``dtype`` on to the model's constructor."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def load_model(section: ModelSection, seed: int = 0, num_labels: int = 0) -> LoadedModel:
    """Build or load ``section.name``; ``num_labels`` resizes a classifier head when > 0."""
    name = section.name
    if name.startswith(TINY_PREFIX):
        return _load_tiny(section, seed, num_labels)
    if _looks_local(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model {name!r}: looked for a local model folder with a config.json at "
                f"{path.resolve()}, found {'a folder without config.json' if path.is_dir() else 'nothing'}"
            )
        return _load_pretrained(section, str(path), "local", num_labels)
    try:
        return _load_pretrained(section, name, "hub", num_labels)
    except OSError as exc:
        from paca.tiny import TINY_MODELS

        raise ModelNotFoundError(
            f"model {name!r} could not be loaded. Looked for: a built-in tiny model "
            f"({', '.join(TINY_PREFIX + n for n in sorted(TINY_MODELS))}), a local folder "
            f"{Path(name).resolve()} (does not exist), and the hub id {name!r} ({exc}). "
            f"Download it first (huggingface-cli download {name}) or give a local path."
        ) from exc


def _load_tiny(section: ModelSection, seed: int, num_labels: int) -> LoadedModel:
    from paca.tiny import IMAGE_MODELS, TINY_MODELS, build_tiny, byte_tokenizer

    short = section.name[len(TINY_PREFIX) :]
    if short not in TINY_MODELS:
        raise ModelNotFoundError(
            f"model {section.name!r}: no built-in tiny model {short!r}; built-in models: "
            f"{', '.join(TINY_PREFIX + n for n in sorted(TINY_MODELS))}"
        )
    options = dict(section.options)
    if section.attn_implementation:
        options.setdefault("attn_implementation", section.attn_implementation)
    is_vit = short in IMAGE_MODELS  # tiny-vit and the shipped digits classifiers
    if is_vit and num_labels:
        options.setdefault("num_labels", num_labels)
    try:
        model = build_tiny(short, seed=seed, **options)
    except TypeError as exc:
        raise ExperimentError(f"[model].options do not fit {section.name}: {exc}") from None
    model = _quantized(model.to(_dtype(section)), section)
    if is_vit:
        cfg = model.config
        return LoadedModel(
            model, "image-classification", source="builtin", image_size=cfg.image_size,
            num_labels=cfg.num_labels,
        )  # fmt: skip
    return LoadedModel(model, "causal-lm", tokenizer=byte_tokenizer(), source="builtin")


#: Output heads a 4-bit quantization leaves dense (as transformers' bitsandbytes loader).
_HEADS = ["lm_head", "classifier", "score", "head"]


def _quantized(model: nn.Module, section: ModelSection) -> nn.Module:
    """A built-in model with ``[model].quantization`` applied (every linear but the head)."""
    if section.quantization != "nf4":
        return model
    from paca.layers_quant import quantize_nf4

    return quantize_nf4(model, "all-linear", exclude_modules=_HEADS)


def _infer_task(config: Any) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ImageClassification" in archs or getattr(config, "model_type", "") in {"vit", "deit"}:
        return "image-classification"
    return "causal-lm"


def _load_pretrained(section: ModelSection, name: str, source: str, num_labels: int) -> LoadedModel:
    from transformers import AutoConfig

    common: dict[str, Any] = {"trust_remote_code": section.trust_remote_code}
    if section.revision:
        common["revision"] = section.revision
    config = AutoConfig.from_pretrained(name, **common)
    task = section.task if section.task != "auto" else _infer_task(config)
    kwargs: dict[str, Any] = {**common, _dtype_keyword(): _dtype(section)}
    if section.quantization == "nf4":  # quantized while loading, as QLoRA does
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(section),
        )
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    tok_name = section.tokenizer or name
    if task == "image-classification":
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if num_labels and num_labels != getattr(config, "num_labels", None):
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        model = AutoModelForImageClassification.from_pretrained(name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(tok_name, **common)
        size = getattr(model.config, "image_size", 224)
        return LoadedModel(
            model, task, image_processor=processor, source=source, image_size=size,
            num_labels=model.config.num_labels,
        )  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if section.quantization == "nf4":  # no in-place CPU inference repack (see quantize_nf4)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    tokenizer = AutoTokenizer.from_pretrained(tok_name, **common)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # LLaMA tokenizers ship no pad token
    logger.info("loaded %s model %s (%s)", source, name, type(model).__name__)
    return LoadedModel(model, task, tokenizer=tokenizer, source=source)
