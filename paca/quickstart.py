"""The embedded default job behind a bare ``paca run``: no downloads, a few minutes on CPU.

A tiny LLaMA-architecture model is built from a config (random init) and fine-tuned
with PaCA on the built-in generated instruction data; the loss before and after and
the trainable-parameter count are reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger("paca.quickstart")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class QuickstartSettings:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 64
    r: int = 16
    lr: float = 3e-2
    seed: int = 0
    examples: int = 2000
    eval_batches: int = 4


def _mean_loss(
    model: torch.nn.Module, data: dict[str, torch.Tensor], batches: int, bs: int
) -> float:
    model.eval()
    with torch.no_grad():
        losses = [
            float(model(**{k: v[i * bs : (i + 1) * bs] for k, v in data.items()}).loss)
            for i in range(batches)
        ]
    model.train()
    return sum(losses) / len(losses)


def run_quickstart(
    settings: QuickstartSettings | None = None, backend: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune the tiny default model; returns losses, counts and timings."""
    from tqdm.auto import tqdm

    import paca
    from paca.tiny import byte_tokenizer, instruction_dataset, tiny_llama, tokenize_for_clm

    s = settings or QuickstartSettings()
    torch.manual_seed(s.seed)
    b = paca.use_backend(backend) if backend else paca.get_backend()
    tok = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=s.seed)
    device = b.device()
    train = tokenize_for_clm(instruction_dataset(s.examples, seed=s.seed), tok, seq_len=s.seq_len)
    held_out = tokenize_for_clm(
        instruction_dataset(s.eval_batches * s.batch_size, seed=s.seed + 1), tok, seq_len=s.seq_len
    )
    train = {k: v.to(device) for k, v in train.items()}
    held_out = {k: v.to(device) for k, v in held_out.items()}

    pm = paca.wrap(
        model, paca.PacaConfig(r=s.r, target_modules=LLAMA_TARGETS, seed=s.seed), backend=b
    )
    trainable, total = pm.trainable_parameters()
    loss_before = _mean_loss(pm, held_out, s.eval_batches, s.batch_size)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=s.lr)
    n = train["input_ids"].shape[0]
    start = time.perf_counter()
    bar = tqdm(range(s.steps), desc=f"PaCA r={s.r} on {b.name}", disable=not progress)
    for step in bar:
        i = (step * s.batch_size) % (n - s.batch_size + 1)
        loss = pm(**{k: v[i : i + s.batch_size] for k, v in train.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    b.synchronize()
    seconds = time.perf_counter() - start
    loss_after = _mean_loss(pm, held_out, s.eval_batches, s.batch_size)
    return {
        "backend": b.name,
        "settings": asdict(s),
        "trainable_params": trainable,
        "total_params": total,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_seconds": seconds,
        "steps_per_second": s.steps / seconds,
    }
