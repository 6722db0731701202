"""Write traffic: the bytes one training step writes, per phase, counted at dispatch.

Step time on a shared machine is noisy; bytes written are exact and repeatable. Each
method's step is run once under :class:`paca.testing.traffic.WriteCounter` (every aten
op's new outputs plus what it writes in place, indexed writes by their source's size),
phase by phase: forward with loss, backward, optimizer step. What PaCA writes beyond the
frozen bound is its whole extra work in memory traffic: the gather of ``x[..., idx]``,
the column swap or the decomposition's small terms, ``d(delta)`` and AdamW on the
deltas. It is reported as a fraction of the adapted weights' bytes (a step that copied
each weight once would show 1.0 more). At the model level PaCA can write *less* than the
bound: the bound backpropagates into the embeddings, while PaCA needs no gradient of the
first layer's attention input. So :func:`layer_traffic` also counts the op's own share
the way its bound (issue 11) is stated: each adapted layer's forward+backward beyond the
same layer frozen, at most 0.1 × its weight's bytes.

The counter sees aten ops only: a kernel launched outside the dispatcher (a Triton
kernel called directly) writes bytes it cannot see.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from paca.bench.methods import MethodSetup
from paca.testing.traffic import WriteCounter

PHASES = ("forward", "backward", "optimizer")


def step_traffic(setup: MethodSetup, input_ids: torch.Tensor) -> dict[str, Any]:
    """Bytes written by one training step of ``setup``, per phase and per aten op.

    Run it in steady state (after a step, so the optimizer state exists): AdamW's first
    step also writes its zero-initialized moments.
    """
    opt = setup.optimizer
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    counts: dict[str, WriteCounter] = {}
    with WriteCounter() as counts["forward"]:
        out = setup.model(input_ids=input_ids, labels=input_ids)
        loss = out.loss
    del out
    with WriteCounter() as counts["backward"]:
        loss.backward()
    del loss
    with WriteCounter() as counts["optimizer"]:
        if opt is not None:
            opt.step()
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    by_op: Counter[str] = Counter()
    for c in counts.values():
        by_op.update(c.by_op)
    return {
        **{f"{p}_bytes": counts[p].bytes for p in PHASES},
        "total_bytes": sum(c.bytes for c in counts.values()),
        "by_op": dict(by_op.most_common()),
        "by_phase_op": {p: dict(counts[p].by_op.most_common()) for p in PHASES},
        "tokens": int(input_ids.numel()),
    }


def extra_traffic(
    method: dict[str, Any], frozen: dict[str, Any], weight_bytes: int
) -> dict[str, Any]:
    """What ``method``'s step writes beyond the frozen bound's, absolute and as a fraction
    of the adapted weights' bytes (fwd+bwd: the op's share; step: with the optimizer)."""
    fb = method["forward_bytes"] + method["backward_bytes"]
    fb_ref = frozen["forward_bytes"] + frozen["backward_bytes"]
    extra_fb = fb - fb_ref
    extra_step = method["total_bytes"] - frozen["total_bytes"]
    return {
        "adapted_weight_bytes": weight_bytes,
        "extra_fwd_bwd_bytes": extra_fb,
        "extra_step_bytes": extra_step,
        "extra_fwd_bwd_fraction": extra_fb / weight_bytes if weight_bytes else None,
        "extra_step_fraction": extra_step / weight_bytes if weight_bytes else None,
    }


def layer_traffic(layers: dict[str, nn.Module], lead: tuple[int, ...]) -> dict[str, Any] | None:
    """Forward+backward bytes of each adapter layer beyond its frozen base layer.

    The bound of issue 11 is per layer: one step of an adapted layer (forward, backward
    with the input's gradient) writes at most 0.1 × its weight's bytes more than the same
    layer frozen. For each distinct weight shape among ``layers`` (modules with a
    ``base_layer``: PaCA and PEFT LoRA layers) one step on an input of shape
    ``(*lead, in)`` is counted both ways, with the layer's real columns and adapter
    weights. None when no layer has a ``base_layer``.
    """
    shapes: dict[str, dict[str, Any]] = {}
    for module in layers.values():
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
        key = f"{in_f}->{out_f}"
        if key in shapes:
            shapes[key]["layers"] += 1
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*lead, in_f, generator=gen).to(weight.device, weight.dtype)
        g = torch.randn(*lead, out_f, generator=gen).to(weight.device, weight.dtype)
        x.requires_grad_(True)
        trained = [p for p in module.parameters() if p.requires_grad]

        def count(fn: nn.Module, x: torch.Tensor = x, g: torch.Tensor = g) -> int:
            x.grad = None
            with WriteCounter() as c:
                fn(x).backward(g)
            return c.bytes

        frozen = count(base)
        adapted = count(module)
        for p in trained:
            p.grad = None
        wbytes = weight.numel() * weight.element_size()
        shapes[key] = {
            "layers": 1,
            "weight_bytes": wbytes,
            "frozen_bytes": frozen,
            "adapted_bytes": adapted,
            "extra_bytes": adapted - frozen,
            "extra_fraction": (adapted - frozen) / wbytes,
        }
    if not shapes:
        return None
    weights = sum(s["weight_bytes"] * s["layers"] for s in shapes.values())
    extra = sum(s["extra_bytes"] * s["layers"] for s in shapes.values())
    return {
        "input_lead_shape": list(lead),
        "shapes": shapes,
        "extra_bytes": extra,
        "extra_fraction": extra / weights,
        "worst_extra_fraction": max(s["extra_fraction"] for s in shapes.values()),
    }
