"""Fake ``hpex.optimizers.FusedAdamW``.

Signature, defaults and update rule follow the bridge's ``FusedAdamW(Optimizer)``:
``(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
moments_dtype=None)``; weight decay is decoupled (``w *= 1 - lr * wd``); bias correction is
folded into the step size (``lr * sqrt(1 - b2^t) / (1 - b1^t)``) with ``eps`` added to the
uncorrected ``sqrt(v)`` -- so it is close to, but not bit-identical with,
``torch.optim.AdamW``. ``step()`` issues a ``mark_step`` per param group and one at the end
in lazy mode, like the real one.

It is a subclass of ``torch.optim.Optimizer`` like the real class (not of ``AdamW``).
Empty parameter groups raise ``ValueError``: gaudi-facts.md section 4 reports the real
kernel crashing on them.
"""

import math

import torch
from torch.optim import Optimizer

from habana_frameworks import _fake_events
from habana_frameworks.torch.core import step_closure


class FusedAdamW(Optimizer):
    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        bias_correction=True,
        moments_dtype=None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[0]} - should be in [0.0, 1.0[")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[1]} - should be in [0.0, 1.0[")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults)
        self.moments_dtype = moments_dtype

    def add_param_group(self, param_group):
        params = param_group["params"]
        if not isinstance(params, torch.Tensor) and not isinstance(params, (list, tuple, set)):
            params = param_group["params"] = list(params)
        if not isinstance(params, torch.Tensor) and len(params) == 0:
            raise ValueError(
                "FusedAdamW: empty parameter group; the HPU fused AdamW kernel does not "
                "support empty param groups (filter them out). [fake Gaudi SDK]"
            )
        super().add_param_group(param_group)

    def _moment_dtypes(self, dtype):
        if self.moments_dtype is None:
            return dtype, dtype
        if isinstance(self.moments_dtype, tuple):
            return self.moments_dtype
        return self.moments_dtype, self.moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _fake_events.record("fused_adamw_step")
        for group in self.param_groups:
            step_closure._mark_step_if_lazy()
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    "Adam does not support sparse gradients, please consider SparseAdam"
                )
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            step_size = group["lr"]
            if group.get("bias_correction", True):
                bc1 = 1.0 - beta1 ** group["step"]
                bc2 = 1.0 - beta2 ** group["step"]
                step_size = step_size * math.sqrt(bc2) / bc1
            decay = 1.0 - group["weight_decay"] * group["lr"]
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    d1, d2 = self._moment_dtypes(p.dtype)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=d1)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=d2)
                state["step"] += 1
                grad = p.grad
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad.to(exp_avg.dtype), alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(
                    grad.to(exp_avg_sq.dtype), grad.to(exp_avg_sq.dtype), value=1.0 - beta2
                )
                if decay != 1.0:
                    p.mul_(decay)
                denom = exp_avg_sq.float().sqrt().add_(group["eps"])
                p.add_((exp_avg.float() / denom).to(p.dtype), alpha=-step_size)
        step_closure._mark_step_if_lazy()
        return loss


__all__ = ["FusedAdamW"]
