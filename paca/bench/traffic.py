"""Write traffic: the bytes one training step writes, per phase, counted at dispatch.

Step time on a shared machine is noisy; bytes written are exact and repeatable. Each
method's step is run once under :class:`paca.testing.traffic.WriteCounter` (every aten
op's new outputs plus what it writes in place, indexed writes by their source's size),
phase by phase: forward with loss, backward, optimizer step. What PaCA writes beyond the
frozen bound is its whole extra work in memory traffic: the gather of ``x[..., idx]``,
the column swap or the decomposition's small terms, ``d(delta)`` and AdamW on the
deltas. It is reported as a fraction of the adapted weights' bytes; the op's bound
(issue 11) is that a layer step writes at most 0.1 × its weight's bytes beyond the
frozen layer, and a step that copied each weight once would show 1.0 here.

The counter sees aten ops only: a kernel launched outside the dispatcher (a Triton
kernel called directly) writes bytes it cannot see.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

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
