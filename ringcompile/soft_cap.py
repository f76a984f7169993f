"""``sdpa_soft_capped``: SDPA's signature with one more argument, a soft cap of the scores.

SDPA has no soft cap (Gemma 2's ``attn_logit_softcapping``: each score ``s = scale * q.k``
becomes ``softcap * tanh(s / softcap)`` before the mask is added). The passes write an attention
whose scores are capped (eager attention written out, a flex ``score_mod``) as a call of this
function, so that every pass reads it as one more SDPA call; the ring op takes its ``softcap``.
Where a call stays (a fallback), it computes the attention written out, as eager code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["sdpa_soft_capped"]


def sdpa_soft_capped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, *, softcap: float) -> torch.Tensor:  # fmt: skip
    """``F.scaled_dot_product_attention`` whose scores are capped at ``softcap`` before the
    mask: ``softmax(softcap * tanh(scale * q @ k^T / softcap) + mask) @ v``."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        n, m = scores.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = scores.softmax(-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ value
