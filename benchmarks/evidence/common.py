"""Helpers shared by ``pretrain.py`` and ``study.py``: data tensors, batches, evaluation.

Data comes from the experiment data layer (``paca.experiment.sources``: the same rows
``paca run`` uses for ``paca.data/...``), turned into whole tensors once, because these
models are so small that per-example Python work would dominate a step.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def digits_tensors(spec: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels (n, 1, 8, 8), labels (n,))`` of ``paca.data/digits:spec``."""
    from paca.experiment.sources import load_source

    rows, _ = load_source(f"paca.data/digits:{spec}", split)
    return torch.stack([r["image"] for r in rows]), torch.tensor([r["label"] for r in rows])


def text_tensors(name: str, split: str, seq_len: int, limit: int = 0) -> dict[str, torch.Tensor]:
    """Tokenized chunks of ``paca.data/name`` (byte tokenizer, exactly ``seq_len`` tokens)."""
    from paca.experiment.sources import load_source
    from paca.tiny import byte_tokenizer, tokenize_for_clm

    rows, _ = load_source(f"paca.data/{name}", split, seq_len)
    if limit:
        rows = rows[:limit]
    return tokenize_for_clm([r["text"] for r in rows], byte_tokenizer(), seq_len=seq_len)


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches: seeded epoch permutations, drop-last."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            out.append(perm[i : i + batch_size])
            if len(out) == steps:
                break
    return out


def shift_augment(pixels: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background -1 fills the edge)."""
    n, _, h, w = pixels.shape
    pad = torch.nn.functional.pad(pixels, [max_shift] * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate factor: linear warm-up, then constant or cosine to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 512
) -> dict[str, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(labels), batch):
        out = model(pixel_values=pixels[i : i + batch], labels=labels[i : i + batch])
        loss += float(out.loss) * len(labels[i : i + batch])
        correct += int((out.logits.argmax(-1) == labels[i : i + batch]).sum())
    return {"loss": loss / len(labels), "accuracy": correct / len(labels)}


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int = 64) -> dict:
    """Mean next-token loss over all label tokens (token-weighted), perplexity, accuracy."""
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    n = data["input_ids"].shape[0]
    for i in range(0, n, batch):
        chunk = {k: v[i : i + batch] for k, v in data.items()}
        logits = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), chunk["labels"][:, 1:]
        mask = labels != -100
        total += float(
            torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        )
        tokens += int(mask.sum())
        correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / max(tokens, 1)}


def environment() -> dict[str, Any]:
    import transformers

    try:
        import sklearn

        sk = sklearn.__version__
    except ImportError:
        sk = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sk,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
