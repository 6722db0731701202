"""Fake ``hpex.normalization``: ``FusedRMSNorm`` and ``FusedClipNorm``.

``FusedRMSNorm.apply(x, weight, eps)`` requires ``x`` and ``weight`` of the same dtype
(optimum-habana casts them; gaudi-facts.md section 4) and raises otherwise. It computes in
float32 and returns ``x.dtype``. (vLLM additionally feeds 3-D inputs; any rank works here.)
"""

import torch

from habana_frameworks import _fake_events


class FusedRMSNorm:
    @staticmethod
    def apply(x, weight, eps=1e-6):
        if x.dtype != weight.dtype:
            raise RuntimeError(
                f"FusedRMSNorm: input dtype {x.dtype} and weight dtype {weight.dtype} must "
                "match. [fake Gaudi SDK]"
            )
        _fake_events.record("fused_rmsnorm")
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * weight.float()).to(x.dtype)


class FusedClipNorm:
    """``FusedClipNorm(parameters, max_norm)``; ``clip_norm(parameters)`` returns the total norm."""

    def __init__(self, parameters, max_norm, norm_type=2.0):
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def clip_norm(self, parameters):
        _fake_events.record("fused_clip_norm")
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_norm, self.norm_type)


__all__ = ["FusedRMSNorm", "FusedClipNorm"]
