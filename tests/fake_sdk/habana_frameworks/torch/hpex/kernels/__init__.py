"""Fake ``hpex.kernels``: ``FusedSDPA`` delegating to ``F.scaled_dot_product_attention``.

Real signature (gaudi-facts.md section 4): ``FusedSDPA.apply(q, k, v, attn_mask, dropout_p,
is_causal, scale, softmax_mode[, recompute_mode, valid_sequence_lengths, padding_side])``.
``softmax_mode`` ("None"/"fast"), ``recompute_mode``, ``valid_sequence_lengths`` and
``padding_side`` are accepted and ignored.
"""

import torch.nn.functional as F

from habana_frameworks import _fake_events


class FusedSDPA:
    @staticmethod
    def apply(
        q,
        k,
        v,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        softmax_mode="None",
        recompute_mode=None,
        valid_sequence_lengths=None,
        padding_side="left",
    ):
        _fake_events.record("fused_sdpa")
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )


__all__ = ["FusedSDPA"]
