"""Built-in, generated data a tiny random-init model can visibly learn on a CPU.

The text tasks are short templated instruction/response pairs (arithmetic, copying,
reversing and upper-casing short words, a fixed table of facts). Each formatted
example fits in 64 byte tokens, so training uses small static shapes (Gaudi needs
static shapes; CPUs like small ones). The fixed parts (word list, facts, image class
templates) never depend on ``seed``: different seeds give different samples of the
*same* task, so a ``seed=1`` split is a fair held-out set for a ``seed=0`` one.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch

INSTRUCTION_HEADER = "### Instruction: "
RESPONSE_HEADER = "\n### Response: "
#: Rows in the shipped ``paca/data/instructions.jsonl`` (``instruction_dataset(500, 0)``).
BUILTIN_JSONL_ROWS = 500
BUILTIN_JSONL_SEED = 0

WORDS: tuple[str, ...] = (
    "apple", "house", "river", "cloud", "stone", "green", "table", "light", "music",
    "bread", "chair", "dream", "earth", "flame", "grape", "horse", "lemon", "mouse",
    "night", "ocean", "paper", "queen", "robot", "snake", "tiger", "water", "zebra",
    "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "rain", "snow", "wind",
    "book", "door", "road", "ship", "gold", "king", "lamp", "milk", "rose", "sand",
)  # fmt: skip

FACTS: dict[str, str] = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "lemon": "yellow",
    "blood": "red", "carrot": "orange", "plum": "purple", "sea": "blue", "banana": "yellow",
    "leaf": "green", "cherry": "red", "milk": "white", "night": "black", "gold": "yellow",
    "rose": "red",
}  # fmt: skip


class _Tokenizer(Protocol):
    """What :func:`tokenize_for_clm` needs from a (Hugging Face) tokenizer."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"add {a} and {b}", str(a + b)


def _copy(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"copy: {word}", word


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"reverse: {word}", word[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"uppercase: {word}", word.upper()


def _fact(rng: random.Random) -> tuple[str, str]:
    key = rng.choice(sorted(FACTS))
    return f"color of {key}", FACTS[key]


#: The task generators, by name; each draws one (instruction, response) pair.
TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "copy": _copy,
    "reverse": _reverse,
    "upper": _upper,
    "fact": _fact,
}


def instruction_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` generated examples ``{"instruction", "response"}``; same ``seed``, same list."""
    rng = random.Random(seed)
    names = list(TASKS)
    rows = []
    for _ in range(n):
        instruction, response = TASKS[rng.choice(names)](rng)
        rows.append({"instruction": instruction, "response": response})
    return rows


def format_prompt(example: Mapping[str, str]) -> str:
    """The prompt part of an example (ends where the response starts), for generation."""
    return f"{INSTRUCTION_HEADER}{example['instruction']}{RESPONSE_HEADER}"


def format_example(example: Mapping[str, str]) -> str:
    """``"### Instruction: ...\\n### Response: ..."``: the text a model is trained on."""
    return format_prompt(example) + example["response"]


def tokenize_for_clm(
    examples: Sequence[Mapping[str, str] | str],
    tokenizer: _Tokenizer,
    seq_len: int = 64,
    mask_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize to fixed ``(len(examples), seq_len)`` int64 tensors for causal-LM training.

    Each row is ``[bos] text [eos]`` (bos/eos only if the tokenizer has them), truncated
    to ``seq_len`` and right-padded to exactly ``seq_len`` so shapes are static.
    ``labels`` equal ``input_ids`` (the model shifts them) except padding, and the
    prompt too when ``mask_prompt`` is true, which are -100 (ignored by the loss).
    Examples may be dicts (formatted with :func:`format_example`) or plain strings.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
    prefix = [bos] if bos is not None else []
    suffix = [eos] if eos is not None else []

    input_ids = torch.full((len(examples), seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), seq_len), dtype=torch.long)
    labels = torch.full((len(examples), seq_len), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        text = example if isinstance(example, str) else format_example(example)
        ids = (prefix + tokenizer.encode(text, add_special_tokens=False) + suffix)[:seq_len]
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = input_ids[row, :n]
        if mask_prompt and not isinstance(example, str):
            n_prompt = len(prefix) + len(
                tokenizer.encode(format_prompt(example), add_special_tokens=False)
            )
            labels[row, : min(n_prompt, n)] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _class_templates(num_classes: int, image_size: int, channels: int) -> torch.Tensor:
    """One fixed pattern per class: a class colour times stripes at a class angle."""
    gen = torch.Generator().manual_seed(20240531)
    colours = torch.rand(num_classes, channels, generator=gen) * 2 - 1
    coords = torch.arange(image_size, dtype=torch.float32) / image_size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    templates = torch.empty(num_classes, channels, image_size, image_size)
    for c in range(num_classes):
        angle = math.pi * c / num_classes
        freq = 2.0 + (c % 3)
        stripes = torch.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)))
        templates[c] = colours[c][:, None, None] * (0.5 + 0.5 * stripes)[None]
    return templates


def image_dataset(
    n: int,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 0.5,
    channels: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic image classification: ``(pixel_values (n,C,H,W) float32, labels (n,) int64)``.

    Each image is its class template (colour + oriented stripes, fixed across seeds)
    plus Gaussian noise of std ``noise``: learnable by a tiny ViT in a few dozen steps.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=gen)
    templates = _class_templates(num_classes, image_size, channels)
    pixel_values = templates[labels] + noise * torch.randn(
        n, channels, image_size, image_size, generator=gen
    )
    return pixel_values, labels


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file (one object per non-blank line)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def save_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``rows`` as JSON lines (UTF-8, ``\\n`` line ends)."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def builtin_instructions_path() -> Path:
    """Path of the shipped ``paca/data/instructions.jsonl``."""
    return Path(str(resources.files("paca.data") / "instructions.jsonl"))


def main() -> None:
    """Regenerate the shipped JSONL: ``python -m paca.tiny.data``."""
    path = builtin_instructions_path()
    save_jsonl(instruction_dataset(BUILTIN_JSONL_ROWS, BUILTIN_JSONL_SEED), path)
    print(f"wrote {BUILTIN_JSONL_ROWS} rows to {path}")


if __name__ == "__main__":
    main()
