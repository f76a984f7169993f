"""One shard's decode partial in Triton: a few query rows over many keys, split over the keys.

A decode step has T (1, or a few) new queries per head against a shard of S_r cached keys. A
flash-attention forward gives each query tile one program, which here is one program per head
scanning every key: a few dozen programs on a GPU of a hundred and more SMs, each reading the
whole shard. This kernel instead gives one program to each (batch, KV head, key split): the G
query heads of the KV head times T queries are the rows of one tile (GQA without copying K/V),
and the splits together read each key once. Each split leaves its normalised partial and
log-sum-exp in fp32; ``decode_partial`` merges the splits with torch ops (a few elements per
row), which the compiler around it fuses.

Masks: keys at positions after a query's (causal by global position; empty cache slots sit at
``POSITION_NONE``) and keys marked invalid (padding) are hidden. K and V are read in their own
dtype; the scores, softmax statistics and accumulators are fp32, and the probabilities are
rounded to V's dtype before P·V, as in the ring's forward kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ringcompile.kernels.triton.configs import _sm_count
from ringcompile.kernels.triton.jit import (
    _LOG2E,
    LAUNCH_OPTIONS,
    _masked_softmax_step,
    _softmax_result,
    dot_precision,
)

__all__ = ["decode_partial"]

_BLOCK_N = 64


@triton.jit
def _decode_split_kernel(
    Q, K, V, QPOS, KPOS, VALID, OUT, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_qpb, stride_kpb, stride_valb,
    S, T, HKV, keys_per_split, n_splits, qk_scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = bk // HKV
    hk = bk % HKV
    rows = tl.arange(0, ROWS)
    row_ok = rows < G * T
    head = hk * G + rows // T
    t = rows % T
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    if CAUSAL:
        q_pos = tl.load(QPOS + b * stride_qpb + t, mask=row_ok, other=0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, S)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale
        keep = n_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            k_pos = tl.load(KPOS + b * stride_kpb + offs_n, mask=n_ok, other=0)
            keep = keep & (k_pos[None, :] <= q_pos[:, None])
        if HAS_VALID:
            valid = tl.load(VALID + b * stride_valb + offs_n, mask=n_ok, other=0)
            keep = keep & (valid[None, :] != 0)
        m_i, l_i, acc = _masked_softmax_step(
            m_i, l_i, acc, tl.where(keep, s, float("-inf")), v, DOT
        )
    out, lse = _softmax_result(m_i, l_i, acc)
    # (B, HKV, n_splits, ROWS, D) and (B, HKV, n_splits, ROWS), contiguous
    part = (bk * n_splits + split) * ROWS + rows
    tl.store(OUT + part[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + part, lse, mask=row_ok)


def _splits(S: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(keys per split, number of splits): about four programs per SM, whole key tiles each (off
    CUDA, the interpreter, as if there were four SMs: several splits to test)."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    want = max(1, min(triton.cdiv(S, _BLOCK_N), triton.cdiv(4 * sms, max(programs, 1))))
    per = triton.cdiv(triton.cdiv(S, want), _BLOCK_N) * _BLOCK_N
    return per, triton.cdiv(S, per)


@torch.library.custom_op("ringcompile::decode_partial", mutates_args=())
def decode_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   q_positions: torch.Tensor | None, k_positions: torch.Tensor | None,
                   key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This shard's normalised output (B, H, T, D) and log-sum-exp (B, H, T), fp32.

    q (B, H, T, D); k, v (B, Hkv, S, D) with H a multiple of Hkv; causal by global position when
    the positions are given ((T,) or (B, T); (S,) or (B, S)); ``key_valid`` (B, S) bool hides
    padding keys. An op, so that a compiled decode graph calls the kernel as it is."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    rows = max(16, triton.next_power_of_2(G * T))
    dev = q.device
    if S == 0:
        return (
            torch.zeros(B, H, T, D, dtype=torch.float32, device=dev),
            torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=dev),
        )
    per, n_splits = _splits(S, B * Hkv, dev)
    out = torch.empty(B, Hkv, n_splits, rows, D, dtype=torch.float32, device=dev)
    lse = torch.empty(B, Hkv, n_splits, rows, dtype=torch.float32, device=dev)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    causal = q_positions is not None
    qpos = q_positions if causal else q
    kpos = k_positions if causal else q
    valid = key_valid.view(torch.uint8) if key_valid is not None else q
    _decode_split_kernel[(B * Hkv, n_splits)](
        q, k, v, qpos, kpos, valid, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        qpos.stride(0) if causal and qpos.dim() == 2 else 0,
        kpos.stride(0) if causal and kpos.dim() == 2 else 0,
        valid.stride(0) if key_valid is not None else 0,
        S, T, Hkv, per, n_splits, scale * _LOG2E,
        G=G, ROWS=rows, D=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK_N=_BLOCK_N,
        CAUSAL=causal, HAS_VALID=key_valid is not None, DOT=dot_precision(q.dtype),
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    # merge the splits: rows (G * T) of KV head hk are query heads hk * G + r // T, queries r % T
    out, lse = out[..., : G * T, :], lse[..., : G * T]
    total = torch.logsumexp(lse, dim=2)  # (B, Hkv, G * T)
    w = torch.exp(lse - total.unsqueeze(2)).nan_to_num(0.0)
    merged = (w.unsqueeze(-1) * out).sum(2)  # (B, Hkv, G * T, D)
    return merged.reshape(B, H, T, D), total.reshape(B, H, T)


@decode_partial.register_fake
def _(q, k, v, scale, q_positions, k_positions, key_valid):
    B, H, T, D = q.shape
    return (
        q.new_empty((B, H, T, D), dtype=torch.float32),
        q.new_empty((B, H, T), dtype=torch.float32),
    )
