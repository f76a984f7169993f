"""Input checks that ``ring_attention`` and ``tree_attn_decode`` share: each error names the
problem and the fix."""

from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: str) -> None:
    """4-D q, k, v of one floating dtype on one device; k (B, Hkv, ``keys``, D) with q's batch and
    head dim, v with k's first three sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{fn} expects 4-D (batch, heads, seq, head_dim) tensors; {name} has "
                f"shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}: cast them to one"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"{fn} supports floating dtypes, got {q.dtype}")
    B, D = q.shape[0], q.shape[3]
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k must be (B={B}, Hkv, {keys}, D={D}) and v (B, Hkv, {keys}, Dv) with k's first "
            f"three sizes; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def check_gqa(H: int, Hkv: int, enable_gqa: bool) -> None:
    """SDPA's rule: Hkv < H needs enable_gqa, and H a multiple of Hkv; one K/V head needs
    neither (SDPA broadcasts it against every query head: multi-query attention as Falcon-7B
    writes it)."""
    if H == Hkv or Hkv == 1:
        return
    if not enable_gqa:
        raise ValueError(
            f"q has {H} heads and k/v have {Hkv}: pass enable_gqa=True for grouped-query "
            "attention (as with F.scaled_dot_product_attention)"
        )
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
