"""A tiny PaCA fine-tuning loop that runs unchanged on every paca backend.

    PACA_BACKEND=cpu python examples/train_tiny.py
    PACA_BACKEND=hpu python examples/train_tiny.py          # Intel Gaudi, lazy or eager
    PACA_BACKEND=hpu PT_HPU_LAZY_MODE=0 python examples/train_tiny.py --compile

Nothing here names a device: the backend supplies the device, the autocast device
type and the torch.compile backend, and on a Gaudi in lazy mode it marks the step
boundaries itself (no ``htcore.mark_step()`` in this file). Inputs are padded to a
fixed length so every step has the same shapes (Gaudi compiles each new shape).

Prints one ``step <n> loss <value>`` line per optimizer step (``float.hex`` too, so
two runs can be compared bit for bit) and a final JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import paca
from paca.tiny import byte_tokenizer, instruction_dataset, tiny_llama, tokenize_for_clm

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=32, help="fixed (padded) sequence length")
    p.add_argument("--r", type=int, default=8, help="PaCA columns per layer")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16: autocast around forward and loss, fp32 PaCA deltas (the Gaudi recipe)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile with the backend's compiler"
    )
    p.add_argument("--eval-batches", type=int, default=1, help="held-out batches after training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    backend = paca.get_backend()  # PACA_BACKEND, paca.use_backend(...) or auto-detection
    device = backend.device()
    torch.manual_seed(args.seed)

    tok = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=args.seed)
    n_train = args.steps * args.grad_accum * args.batch_size
    train = tokenize_for_clm(instruction_dataset(n_train, seed=args.seed), tok, args.seq_len)
    held_out = tokenize_for_clm(
        instruction_dataset(max(args.eval_batches, 1) * args.batch_size, seed=args.seed + 1),
        tok,
        args.seq_len,
    )
    train = {k: v.to(device) for k, v in train.items()}
    held_out = {k: v.to(device) for k, v in held_out.items()}

    config = paca.PacaConfig(r=args.r, target_modules=LLAMA_TARGETS, seed=args.seed)
    pm = paca.wrap(model, config, backend=backend)
    trainable, total = pm.trainable_parameters()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
    if args.compile and "compile" not in backend.capabilities:
        sys.exit(
            f"--compile: backend {backend.name!r} cannot torch.compile in this process "
            f"(capabilities: {', '.join(sorted(backend.capabilities))}); "
            "on Gaudi, start with PT_HPU_LAZY_MODE=0"
        )
    step_model = (
        torch.compile(pm, backend=backend.compile_backend() or "inductor") if args.compile else pm
    )
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    print(f"backend: {json.dumps(backend.describe(), default=str)}", flush=True)
    print(f"trainable params: {trainable} of {total}", flush=True)
    losses: list[float] = []
    bs = args.batch_size
    for step in range(args.steps):
        step_loss = 0.0
        for micro in range(args.grad_accum):
            start = (step * args.grad_accum + micro) * bs
            batch = {k: v[start : start + bs] for k, v in train.items()}
            with torch.autocast(**autocast):
                loss = step_model(**batch).loss / args.grad_accum
            loss.backward()
            step_loss += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        print(f"step {step} loss {step_loss:.6f} {step_loss.hex()}", flush=True)

    eval_model = backend.prepare_for_inference(pm)  # HPU graphs on a Gaudi in lazy mode
    eval_losses = []
    with torch.no_grad():
        for i in range(args.eval_batches):
            batch = {k: v[i * bs : (i + 1) * bs] for k, v in held_out.items()}
            with torch.autocast(**autocast):
                eval_losses.append(eval_model(**batch).loss.item())
    backend.synchronize()
    summary = {
        "backend": backend.name,
        "losses": losses,
        "losses_hex": [v.hex() for v in losses],
        "eval_losses": eval_losses,
        "trainable_params": trainable,
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
