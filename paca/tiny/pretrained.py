"""Small *pretrained* models shipped with paca, so fine-tuning starts from real features.

``benchmarks/evidence/pretrain.py`` trains them reproducibly (fixed seeds, minutes on 2
CPU cores) and writes ``checkpoints/NAME.safetensors`` plus ``checkpoints/NAME.json``
(the builder and its architecture, the data, the seed, the command and the result):

=============  ==========================================  ==================================
name           architecture                                pretrained on
=============  ==========================================  ==================================
digits-cnn     4 ``nn.Conv2d`` layers + a linear head      scikit-learn digits, classes 0-4
digits-vit     ViT, 8x8 images, 2x2 patches, 4 layers      scikit-learn digits, classes 0-4
code-llama     LLaMA, byte tokenizer, 3 layers, hidden 96  the standard library's own source
=============  ==========================================  ==================================

:func:`load_pretrained` builds the architecture from the JSON, loads the weights and,
for classifiers, can put a new randomly initialised head on top (``new_head=True`` or a
different ``num_labels``), drawn from ``seed``. Asking for another architecture than the
checkpoint's (``hidden=32``) or loading a file whose tensors do not fit is an error that
says what differs; ``pretrained=False`` gives the same architecture at random init (the
"from scratch" reference), where other sizes are allowed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
#: The shipped checkpoints, by the name an experiment file uses (``paca.tiny/NAME``).
PRETRAINED = ("digits-cnn", "digits-vit", "code-llama")
#: Keyword arguments of the loader that are not architecture (never a mismatch).
_RUNTIME_KEYS = {"attn_implementation"}


class CheckpointMismatchError(ValueError):
    """A shipped checkpoint does not fit the model the experiment asks for."""


# ------------------------------------------------------------------------ the CNN
def _cnn_config_class() -> type:
    from transformers import PretrainedConfig

    class DigitsCNNConfig(PretrainedConfig):
        """Config of :class:`DigitsCNN` (a ``PretrainedConfig``, so PEFT and Trainer see one)."""

        model_type = "paca-digits-cnn"

        def __init__(
            self,
            channels: int = 1,
            widths: tuple[int, ...] | list[int] = (16, 32, 64, 64),
            image_size: int = 8,
            num_labels: int = 5,
            **kwargs: Any,
        ) -> None:
            super().__init__(num_labels=num_labels, **kwargs)
            self.channels = channels
            self.widths = list(widths)
            self.image_size = image_size

    return DigitsCNNConfig


class DigitsCNN(nn.Module):
    """A small CNN classifier: ``conv1..convN`` (3x3, ReLU; 2x2 max-pool after conv2 and
    conv3), global average pooling and a linear ``classifier``.

    ``forward(pixel_values, labels=None)`` returns transformers'
    ``ImageClassifierOutput`` (``loss`` when labels are given), so it trains with the
    same Trainer, PaCA and PEFT code as the transformers models.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        widths = [config.channels, *config.widths]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True), 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1))
        self.n_convs = len(config.widths)
        self.classifier = nn.Linear(widths[-1], config.num_labels)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: Any
    ) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutput

        x = pixel_values
        for i in range(1, self.n_convs + 1):
            x = torch.relu(getattr(self, f"conv{i}")(x))
            if i in (2, 3) and x.shape[-1] >= 2:
                x = nn.functional.max_pool2d(x, 2)
        logits = self.classifier(x.mean(dim=(-2, -1)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def digits_cnn(
    channels: int = 1,
    widths: tuple[int, ...] | list[int] = (16, 32, 64, 64),
    image_size: int = 8,
    num_labels: int = 5,
    seed: int = 0,
    attn_implementation: str | None = None,  # accepted for a uniform builder signature
) -> DigitsCNN:
    """A random-init :class:`DigitsCNN` drawn from ``seed`` (the global RNG is untouched)."""
    config = _cnn_config_class()(
        channels=channels, widths=widths, image_size=image_size, num_labels=num_labels
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(config)
    return model.train(False)


# ----------------------------------------------------------------- checkpoints
def _builders() -> dict[str, Callable[..., nn.Module]]:
    from .models import tiny_llama, tiny_vit

    return {"digits_cnn": digits_cnn, "tiny_vit": tiny_vit, "tiny_llama": tiny_llama}


def checkpoint_paths(name: str, directory: str | Path | None = None) -> tuple[Path, Path]:
    """``(weights, record)`` of checkpoint ``name`` (default: the shipped one)."""
    folder = Path(directory) if directory is not None else CHECKPOINT_DIR
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def checkpoint_record(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """The JSON written beside a checkpoint: builder, architecture, data, seed, command."""
    if directory is None and name not in PRETRAINED:
        raise ValueError(f"no shipped checkpoint {name!r}; shipped: {', '.join(PRETRAINED)}")
    weights, record = checkpoint_paths(name, directory)
    missing = [str(p) for p in (weights, record) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {name!r} is missing its file(s) {', '.join(missing)}; reinstall paca "
            f"or recreate them with: python benchmarks/evidence/pretrain.py --only {name}"
        )
    return json.loads(record.read_text(encoding="utf-8"))


# transformers 4.x names ViT weights differently from 5.x (which wrote the checkpoint).
_VIT_4X = (
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def _fit_key_layout(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with keys renamed to the layout the installed transformers uses, if needed."""
    if set(state) <= wanted or not any(k.startswith("vit.layers.") for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        for pattern, repl in _VIT_4X:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    return renamed if set(renamed) <= wanted else state


def _check_fits(
    name: str,
    state: dict[str, torch.Tensor],
    model: nn.Module,
    skip: set[str],
    directory: str | Path | None = None,
) -> None:
    """Raise :class:`CheckpointMismatchError` listing every key or shape that differs."""
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    given = {k: v for k, v in state.items() if k not in skip}
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(given) & set(expected))
        if given[k].shape != expected[k].shape
    ]
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:6])}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:6])}")
    if shapes:
        problems.append("different shapes: " + "; ".join(shapes[:6]))
    if problems:
        weights, record = checkpoint_paths(name, directory)
        raise CheckpointMismatchError(
            f"checkpoint {weights} does not fit the model built from {record.name}: "
            + " | ".join(problems)
            + f". Recreate it with: python benchmarks/evidence/pretrain.py --only {name}"
        )


def load_pretrained(
    name: str,
    seed: int = 0,
    num_labels: int = 0,
    new_head: bool = False,
    pretrained: bool = True,
    checkpoint_dir: str | Path | None = None,
    **overrides: Any,
) -> nn.Module:
    """The shipped pretrained model ``name`` in eval mode.

    ``num_labels``: classes of the head (0 = the checkpoint's); a different number, or
    ``new_head=True``, gives a new head initialised from ``seed`` (the rest of the model
    is the checkpoint's). ``checkpoint_dir``: read ``NAME.safetensors``/``NAME.json`` from
    there instead of the shipped folder. ``pretrained=False``: the architecture at random init from
    ``seed``, where ``overrides`` may change it; with weights, an override that differs
    from the checkpoint's architecture is a :class:`CheckpointMismatchError`.
    """
    record = checkpoint_record(name, checkpoint_dir)
    builder = _builders()[record["builder"]]
    arch = dict(record["config"])
    head = record.get("head")
    if pretrained:
        differs = {
            k: v
            for k, v in overrides.items()
            if k not in _RUNTIME_KEYS and _normal(arch.get(k, _MISSING)) != _normal(v)
        }
        if differs:
            asked = ", ".join(f"{k}={v!r}" for k, v in differs.items())
            has = ", ".join(f"{k}={arch.get(k, '(not a setting)')!r}" for k in differs)
            raise CheckpointMismatchError(
                f"paca.tiny/{name} is a pretrained checkpoint with {has}; the experiment "
                f"asks {asked}. Drop these [model].options to fine-tune the checkpoint, or "
                f"set options.pretrained = false for a random-init model of another shape"
            )
    arch.update(overrides)
    if head is None:
        if num_labels or new_head:
            raise CheckpointMismatchError(
                f"paca.tiny/{name} is a {record['task']} model: it has no classifier head "
                f"(num_labels / new_head do not apply)"
            )
    else:
        arch["num_labels"] = num_labels or arch["num_labels"]
    try:
        model = builder(seed=seed, **arch)
    except TypeError as exc:
        raise TypeError(f"paca.tiny/{name}: {exc}") from None
    if not pretrained:
        return model
    from safetensors.torch import load_file

    weights, _ = checkpoint_paths(name, checkpoint_dir)
    state = load_file(str(weights))
    state = _fit_key_layout(state, set(model.state_dict()))
    fresh_head = head is not None and (
        new_head or arch["num_labels"] != record["config"]["num_labels"]
    )
    skip = {k for k in state if head and k.startswith(head + ".")} if fresh_head else set()
    if fresh_head:
        skip |= {k for k in model.state_dict() if k.startswith(head + ".")}
    _check_fits(name, state, model, skip, checkpoint_dir)
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=not skip)
    if fresh_head:
        _reset_head(getattr(model, head), seed)
    return model.train(False)


_MISSING = object()


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _reset_head(layer: nn.Linear, seed: int) -> None:
    """A new head: the default ``nn.Linear`` init, drawn from ``seed`` (same on every machine)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    bound = 1 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)


def pretrained_builder(name: str) -> Callable[..., nn.Module]:
    """``load_pretrained`` for ``name``, as a builder of :data:`paca.tiny.TINY_MODELS`."""

    def build(**kwargs: Any) -> nn.Module:
        return load_pretrained(name, **kwargs)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"The shipped pretrained ``{name}`` (see :func:`load_pretrained`)."
    return build
