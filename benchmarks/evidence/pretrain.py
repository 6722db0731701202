"""Pretrain the small models paca ships, reproducibly (fixed seeds, minutes on 2 CPU cores).

    python benchmarks/evidence/pretrain.py                      # all three, into paca/tiny/checkpoints
    python benchmarks/evidence/pretrain.py --only code-llama    # one of them
    python benchmarks/evidence/pretrain.py --steps 20 --out /tmp/ckpt   # a quick smoke run

``digits-cnn`` and ``digits-vit`` learn scikit-learn's digits of classes 0-4
(``paca.data/digits:0-4``, train split, with +-1 pixel shifts as augmentation);
``code-llama`` learns Python's standard-library source (``paca.data/python-code``,
train split). Fine-tuning then moves to digits 5-9 (a new head) and to the Python
documentation (``paca.data/python-docs``): see ``study.py`` and ``docs/results.md``.

Each model is written as ``NAME.safetensors`` (fp32) with ``NAME.json`` beside it: the
builder and architecture (what ``paca.tiny.load_pretrained`` rebuilds), the data, the
seed, every hyper-parameter, this command, the library versions and the held-out
result, and ``tensors_sha256``, a hash of the weights. One torch thread and a fixed seed
make a rerun on the same machine and software give bit-identical weights (the same
``tensors_sha256``; checked for ``digits-cnn``); other CPUs or library versions may
differ in the last bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    batches,
    digits_tensors,
    environment,
    evaluate_classifier,
    evaluate_lm,
    lr_at,
    shift_augment,
    text_tensors,
)

SEED = 0
SPECS: dict[str, dict[str, Any]] = {
    "digits-cnn": {
        "builder": "digits_cnn",
        "config": {"channels": 1, "widths": [16, 32, 64, 64], "image_size": 8, "num_labels": 5},
        "task": "image-classification",
        "head": "classifier",
        "data": "paca.data/digits:0-4",
        "train": {"steps": 1500, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.01,
                  "warmup_steps": 50, "schedule": "cosine", "augment": "shift1"},
    },
    "digits-vit": {
        "builder": "tiny_vit",
        "config": {"image_size": 8, "patch": 2, "channels": 1, "hidden": 64, "layers": 4,
                   "heads": 4, "intermediate": 128, "num_labels": 5, "init_std": 0.02},
        "task": "image-classification",
        "head": "classifier",
        "data": "paca.data/digits:0-4",
        "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05,
                  "warmup_steps": 100, "schedule": "cosine", "augment": "shift1"},
    },
    "code-llama": {
        "builder": "tiny_llama",
        "config": {"vocab_size": 259, "hidden": 96, "layers": 3, "heads": 4, "kv_heads": 2,
                   "intermediate": 256, "max_positions": 256, "init_std": 0.02},
        "task": "causal-lm",
        "head": None,
        "data": "paca.data/python-code",
        "seq_len": 128,
        "train": {"steps": 2500, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.01,
                  "warmup_steps": 100, "schedule": "cosine", "augment": None},
    },
}  # fmt: skip


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes), independent of how
    the file was laid out: two runs that trained the same weights give the same value."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _build(spec: dict[str, Any], seed: int) -> torch.nn.Module:
    from paca.tiny.pretrained import _builders

    return _builders()[spec["builder"]](seed=seed, **spec["config"])


def pretrain(
    name: str, out: Path, steps: int | None = None, seed: int = SEED, log_every: int = 100
) -> dict[str, Any]:
    """Train ``name`` from ``SPECS`` and write its checkpoint and record into ``out``."""
    from safetensors.torch import save_file

    spec = SPECS[name]
    t = dict(spec["train"])
    if steps is not None:
        t["steps"] = steps
    torch.manual_seed(seed)
    model = _build(spec, seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"],
    )  # fmt: skip
    is_lm = spec["task"] == "causal-lm"
    if is_lm:
        source = spec["data"].split("/", 1)[1]
        train = text_tensors(source, "train", spec["seq_len"])
        held_out = text_tensors(source, "test", spec["seq_len"], limit=1024)
        other = text_tensors("python-docs", "test", spec["seq_len"], limit=1024)
        n_train = train["input_ids"].shape[0]
    else:
        classes = spec["data"].split(":", 1)[1]
        x_train, y_train = digits_tensors(classes, "train")
        x_test, y_test = digits_tensors(classes, "test")
        n_train = len(y_train)
    order = batches(n_train, t["batch_size"], t["steps"], seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    curve, started = [], time.perf_counter()
    for step, idx in enumerate(order):
        for group in opt.param_groups:
            group["lr"] = t["lr"] * lr_at(step, t["steps"], t["warmup_steps"], t["schedule"])
        if is_lm:
            loss = model(**{k: v[idx] for k, v in train.items()}).loss
        else:
            pixels = x_train[idx]
            if t["augment"]:
                pixels = shift_augment(pixels, aug_gen)
            loss = model(pixel_values=pixels, labels=y_train[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step + 1 == t["steps"]:
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4)})
            print(f"{name} step {step + 1}/{t['steps']}: loss {loss.item():.4f}", flush=True)
            model.train()
    seconds = time.perf_counter() - started
    model.eval()
    if is_lm:
        result = {
            "held_out": evaluate_lm(model, held_out),
            "python_docs_test": evaluate_lm(model, other),
        }
    else:
        result = {"held_out": evaluate_classifier(model, x_test, y_test)}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"name": name, "config": json.dumps(spec["config"])})
    record = {
        "name": name,
        "builder": spec["builder"],
        "config": spec["config"],
        "task": spec["task"],
        "head": spec["head"],
        "data": spec["data"],
        "data_split": "train",
        "seq_len": spec.get("seq_len"),
        "train": t,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "result": result,
        "result_split": "test",
        "curve": curve,
        "script": "benchmarks/evidence/pretrain.py",
        "command": "python benchmarks/evidence/pretrain.py --only "
        + shlex.quote(name)
        + (f" --steps {steps}" if steps is not None else ""),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "tensors_sha256": tensors_sha256(state),
        "environment": environment(),
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{name}: {json.dumps(result)} in {seconds:.0f}s -> {weights}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    from paca.tiny.pretrained import CHECKPOINT_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(SPECS), action="append", help="model(s) to train")
    p.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="override the step count (smoke runs)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.only or list(SPECS):
        pretrain(name, args.out, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
