"""Tree-attention decoding: a few replicated queries attend to a KV cache sharded by sequence.

In decoding, every rank of the group holds the same new queries ``q`` (B, H, T, D) (T = 1, or a few
for speculative decoding) and its own shard of the KV cache (B, Hkv, S_r, D); shards may differ in
length. Attention over the concatenation of all shards is a log-sum-exp merge of per-shard partial
results (Shyam et al., "Tree Attention", 2024), so no K/V ever moves:

- each rank r computes, in the accumulation dtype (float32, float64 for float64), its normalised
  partial ``o_r = softmax(s_r) v_r`` and ``lse_r = logsumexp(s_r)`` over its keys, with
  ``s_r = scale * q k_r^T`` masked by key padding and by global position when causal (on a GPU:
  SDPA's flash kernel for a half-precision shard without masks, which returns both; a Triton
  kernel split over the shard's keys for masked ones; plain torch ops elsewhere);
- the global result is ``lse = logsumexp_r lse_r`` and ``o = sum_r exp(lse_r - lse) o_r``.

A rank with no visible key for a row has ``lse_r = -inf`` and weight 0; a row no rank can see gives
0 (as SDPA's math backend does).

The merge needs every rank's (o_r, lse_r). As all-reduces it takes two (MAX of lse, then SUM of
the numerator and denominator rescaled by that max, as in the paper). Here it is ONE collective:
each rank packs ``[o_r, lse_r]`` into a (B, H, T, Dv + 1) buffer, a single all-gather gives every
rank all W buffers, and each rank merges them locally (identically, so the result is bit-identical
everywhere). Bytes: each rank sends ``B*H*T*(Dv+1)`` elements of the accumulation dtype (4 bytes,
8 for float64) and receives ``W - 1`` times that, independent of the cache length; all-gathering
the cache instead has each rank receive ``2*B*Hkv*D`` elements of the cache dtype per key held
elsewhere. Decode-sized buffers are latency-bound, so one all-gather beats two all-reduces; the
all-gather's received volume grows with W, which matters only once ``W*B*H*T*(Dv+1)`` leaves the
latency regime.

Traced by ``torch.compile`` (``fullgraph=True`` too, and the ``ring`` backend's decode steps) the
collective is a functional one (``_c10d_functional.all_gather_into_tensor``); run eagerly it is
c10d's own all-gather into a tensor, whose host path is far shorter than the functional one's
wrapper and wait (benchmarks/RESULTS.md). It is for inference: it has no backward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed._functional_collectives as funcol

from ringcompile.checks import check_gqa, check_qkv
from ringcompile.group import all_gather_single, resolve_group
from ringcompile.masks import PositionRules

__all__ = ["tree_attn_decode"]

# torch 2.13 renamed all_gather_tensor to all_gather_single (same signature) and deprecated the
# old name; the supported range (2.11 - 2.14) spans both.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def tree_attn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    mesh_dim: int | str | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA of the replicated queries ``q`` over the KV cache sharded across ``group``'s ranks.

    Args:
        q: (B, H, T, D) the new queries, identical on every rank (not checked: that would cost a
            second collective).
        k, v: (B, Hkv, S_r, D) and (B, Hkv, S_r, Dv): this rank's shard of the cache. ``S_r`` may
            differ between ranks (and may be 0).
        group: None (the world; one process if torch.distributed is not initialised), a
            ProcessGroup, a DeviceMesh (with ``mesh_dim``) or a ``(DeviceMesh, dim)`` pair.
        scale: softmax scale, default ``1/sqrt(D)``.
        enable_gqa: allow Hkv < H; query head i uses KV head ``i // (H // Hkv)`` as SDPA does.
        key_padding_mask: (B, S_r) bool, False marks padding keys no query may see.
        q_positions: (T,) or (B, T) global positions of the queries; with ``is_causal`` only.
        k_positions: (S_r,) or (B, S_r) global positions of this rank's keys; with ``is_causal``.
        is_causal: a query sees the keys whose global position is <= its own (needs both
            position tensors: causality by local index means nothing across shards).

    Returns:
        (B, H, T, Dv) in q's dtype, the same on every rank: SDPA over the concatenation of all
        shards. Rows that see no key are 0. Exactly one collective (an all-gather) runs when the
        group has more than one rank, none otherwise.
    """
    return decode_over_shards(q, k, v, resolve_group(group, mesh_dim), scale, enable_gqa,
                              key_padding_mask, q_positions, k_positions, is_causal,
                              functional=torch.compiler.is_compiling())  # fmt: skip


def decode_over_shards(q, k, v, pg, scale, enable_gqa, key_padding_mask, q_positions,
                       k_positions, is_causal, functional: bool) -> torch.Tensor:  # fmt: skip
    """``tree_attn_decode`` over ``pg``; ``functional``: gather with the functional collective,
    which graphs can hold (callers that run inside a compiled graph say so, whether or not this
    torch reports tracing as compiling)."""
    _check(q, k, v, enable_gqa, key_padding_mask, q_positions, k_positions, is_causal)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "tree_attn_decode is for inference and has no backward: call it under "
            "torch.no_grad() or torch.inference_mode()"
        )
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _local_partial(q, k, v, scale, key_padding_mask, q_positions, k_positions, is_causal)
    if pg is None or pg.size() == 1:
        return out.to(q.dtype)
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).unsqueeze(0)  # (1, B, H, T, Dv + 1)
    if functional:
        # wait now: merging on the async wrapper costs a Python dispatch per op, more than the merge
        gathered = funcol.wait_tensor(_all_gather(packed, 0, pg))  # (W, B, H, T, Dv + 1)
    else:
        gathered = packed.new_empty((pg.size(), *packed.shape[1:]))
        all_gather_single(gathered, packed, group=pg)
    return _merge(gathered[..., :-1], gathered[..., -1]).to(q.dtype)


def _local_partial(q, k, v, scale, key_padding_mask, q_positions, k_positions, is_causal):
    """This shard's normalised output (B, H, T, Dv) and log-sum-exp (B, H, T), both in the
    accumulation dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    if _flash_ok(q, k, v, key_padding_mask, is_causal):
        # A half-precision shard without masks: flash attention reads it in place (split over
        # the keys for a few query rows), far faster than the fp32 matmuls below on long caches.
        # Its output is rounded to q's dtype before the fp32 merge, as SDPA's own output is.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.reshape(B, Hkv, G * T, D), k, v, 0.0, False, False, scale=scale
        )[:2]
        return out.to(acc).reshape(B, H, T, D), lse.reshape(B, H, T)
    if _split_kernel_ok(q, k, v):
        # masked (causal by position, padding) on a GPU: a Triton kernel split over the shard's
        # keys reads K/V once in their dtype (``kernels/triton_decode.py``)
        from ringcompile.kernels.triton_decode import decode_partial

        causal = (q_positions, k_positions) if is_causal else (None, None)
        return decode_partial(q, k, v, scale, *causal, key_padding_mask)
    # The G query heads sharing a KV head become G * T rows against it (a view: query head i is
    # row block i % G of KV head i // G). Broadcasting a group dim in matmul instead would copy
    # each KV head G times.
    qg = q.to(acc).reshape(B, Hkv, G * T, D)
    s = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (B, Hkv, G * T, S_r)
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, None, :]  # (B, 1, 1, 1, S_r)
    if is_causal:
        qp = q_positions if q_positions.dim() == 2 else q_positions.unsqueeze(0)  # (B|1, T)
        kp = k_positions if k_positions.dim() == 2 else k_positions.unsqueeze(0)  # (B|1, S_r)
        # the cache's keys hold no layout padding (empty slots are at POSITION_NONE: not causal)
        causal = PositionRules(causal=True).allows(qp[:, None, None, :, None],
                                                   kp[:, None, None, None, :], None)  # fmt: skip
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        s = s.view(B, Hkv, G, T, S).masked_fill(~allowed, float("-inf")).view(B, Hkv, G * T, S)
    lse = torch.logsumexp(s, dim=-1)  # -inf on rows that see no key here (also when S_r = 0)
    # rows with lse = -inf give NaN (-inf - -inf) here: their probabilities are 0
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.matmul(p, v.to(acc))  # (B, Hkv, G * T, Dv)
    return out.reshape(B, H, T, v.shape[-1]), lse.reshape(B, H, T)


def _flash_ok(q, k, v, key_padding_mask, is_causal) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and key_padding_mask is None
        and not is_causal
        and k.shape[2] > 0
        and v.shape[-1] == q.shape[-1]
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def _split_kernel_ok(q, k, v) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and v.shape[-1] == q.shape[-1] <= 256
        and k.shape[2] > 0
    )


def _merge(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Merge W partials: outs (W, B, H, T, Dv) normalised, lses (W, B, H, T)."""
    lse = torch.logsumexp(lses, dim=0)
    # each weight is <= 1; a row no rank sees has lse = -inf everywhere and gets weight 0, not NaN
    w = torch.exp(lses - lse).nan_to_num(0.0)
    return (w.unsqueeze(-1) * outs).sum(0)


def _check(q, k, v, enable_gqa, key_padding_mask, q_positions, k_positions, is_causal) -> None:
    check_qkv("tree_attn_decode", q, k, v, "S_shard")
    B, H, T, D = q.shape
    check_gqa(H, k.shape[1], enable_gqa)
    S = k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}"
            )
        if key_padding_mask.shape != (B, S) or key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask must be (batch, S_shard) = ({B}, {S}) on {q.device}; got "
                f"{tuple(key_padding_mask.shape)} on {key_padding_mask.device}"
            )
    if not is_causal:
        if q_positions is not None or k_positions is not None:
            raise ValueError("q_positions/k_positions only mean something with is_causal=True")
        return
    for name, t, n in (("q_positions", q_positions, T), ("k_positions", k_positions, S)):
        if t is None:
            raise ValueError(
                f"is_causal=True needs {name}: causality is by global position, and a rank's "
                "local indices say nothing about where its shard sits in the sequence"
            )
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be integers, got {t.dtype}")
        if t.shape not in ((n,), (B, n)) or t.device != q.device:
            raise ValueError(
                f"{name} must be ({n},) or ({B}, {n}) on {q.device}; got {tuple(t.shape)} on "
                f"{t.device}"
            )
