"""The forward kernel of a ring step, and the query-row tile helpers it shares with the dq kernel.

Forward state. ``forward_step`` keeps the partial result *normalised*: an fp32 output ``out`` and
its log-sum-exp ``lse``. A step starts its online softmax from (running max = lse, running sum = 1,
accumulator = out), which is exact, and normalises again at its end, so the state is always a valid
(out, lse) pair. The first step reads no state; the last step (``LAST``) writes the output
straight in the input dtype instead of fp32, so a one-step call is a plain flash-attention forward
with no fp32 round trip. The state passes once per step: it is loaded evict-first and stored
streaming, so it does not push reused K/V out of L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ringcompile.kernels.triton.jit import (
    _ABSENT,
    _LOG2E_K,
    _head,
    _masked_softmax_step,
    _soft_cap,
    _softmax_result,
    _tile_and_head,
)
from ringcompile.kernels.triton.mask_args import (
    _add_mask,
    _dense_keep,
    _key_validity,
    _listed_tile,
    _row_offsets,
    _row_tile_facts,
    _token_rules,
)


@triton.jit
def _load_kv(k_base, v_base, k_st, v_st, offs, ok, d_ok, CHECK_ROWS: tl.constexpr,
             EVEN_D: tl.constexpr):  # fmt: skip
    """The K and V tiles of the keys ``offs`` (``k_base``/``v_base``: their head's slice at the
    head dim's offsets). Full tiles lie inside the block: only a padded head dim is masked."""
    rows = offs[:, None]
    if CHECK_ROWS:
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows * k_st.s, mask=kv_mask, other=0.0)
        v = tl.load(v_base + rows * v_st.s, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_base + rows * k_st.s)
        v = tl.load(v_base + rows * v_st.s)
    else:
        k = tl.load(k_base + rows * k_st.s, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + rows * v_st.s, mask=d_ok[None, :], other=0.0)
    return k, v


@triton.jit
def _partial_scores(q, k_base, v_base, k_st, v_st, mask_args, b, h, offs_m, row_ok, q_pos, q_doc,
                    row_off, offs_k, k_ok, k_doc, d_ok, qk_scale, MASK: tl.constexpr,
                    DOT: tl.constexpr):  # fmt: skip
    """A partial key tile of a query tile: its K and V, the scores (log2 units) with every rule
    evaluated per element, -inf where hidden, and under a soft cap its derivative per score
    (``_ABSENT`` without one)."""
    k, v = _load_kv(k_base, v_base, k_st, v_st, offs_k, k_ok, d_ok, True, False)
    k_pos = tl.load(mask_args.k_pos + offs_k, mask=k_ok, other=0).to(tl.int32)
    k_valid = _key_validity(mask_args, b, offs_k, k_ok, MASK)
    keep = _token_rules(q_pos, k_pos, mask_args, q_doc, k_doc, k_valid, True, MASK) & k_ok[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale
    cap_grad = _ABSENT
    if MASK.softcap:
        s, cap_grad = _soft_cap(s, mask_args.softcap, mask_args.inv_softcap, MASK.softcap)
    keep, bias = _dense_keep(keep, mask_args, b, h, offs_m, row_ok, offs_k, k_ok, True, MASK)
    if MASK.dense_kind == 2:
        s = _add_mask(s, bias, row_off[:, None])
    return k, v, tl.where(keep, s, float("-inf")), cap_grad


@triton.jit
def _fwd_kernel(
    Q, K, V, STATE_OUT, STATE_LSE, FINAL_OUT, q_st, k_st, v_st, final_st, lists, mask_args,
    Sq, Sk, H, GROUP, qk_scale, heads_per_chunk,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    # under causal masks later query tiles see more keys
    tile, bh, b, h = _tile_and_head(tl.cdiv(Sq, BLOCK_M), heads_per_chunk, H, LAST_HEAVIEST=True)
    hk = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = _head(Q, q_st, b, h) + offs_m[:, None] * q_st.s + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = _head(K, k_st, b, hk) + offs_d[None, :]
    v_base = _head(V, v_st, b, hk) + offs_d[None, :]

    state_row = bh.to(tl.int64) * Sq + offs_m  # state tensors are contiguous (B, H, Sq[, D])
    if FIRST:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    else:
        # Resume from the normalised state: max = lse, sum = 1, accumulator = out (exact).
        m_i = tl.load(STATE_LSE + state_row, mask=row_ok, other=float("-inf")) * _LOG2E_K
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        # The state streams through once per step: evict it first, so that it does not push
        # the K/V tiles that other programs are reading out of L2 (2-4 % per step at 8k).
        acc = tl.load(STATE_OUT + state_row[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                      eviction_policy="evict_first")  # fmt: skip

    # Full tiles: every pair visible and the whole key tile inside the block.
    n_full = tl.load(lists.full_count + tile)
    for i in range(n_full):
        offs_k = tl.load(lists.full + tile * lists.stride + i) * BLOCK_N + offs_n
        k, v = _load_kv(k_base, v_base, k_st, v_st, offs_k, None, d_ok, False, HEAD_DIM == D_PAD)
        # max before scaling (qk_scale > 0): scaling and subtracting the max become one FMA
        qk = tl.dot(q, tl.trans(k), input_precision=DOT)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        m_i = m_new

    # Partial tiles: evaluate every rule per element.
    q_pos = tl.load(mask_args.q_pos + offs_m, mask=row_ok, other=0).to(tl.int32)
    row_off = _row_offsets(mask_args, b, h, offs_m, row_ok, MASK)
    q_doc, q_doc_lo, q_doc_hi, _ = _row_tile_facts(mask_args, b, offs_m, row_ok, True, MASK)
    n_part = tl.load(lists.part_count + tile)
    for i in range(n_part):
        _, offs_k, k_ok, k_doc, visit = _listed_tile(lists.part + tile * lists.stride + i, offs_n,
                                                     Sk, mask_args, b, q_doc_lo, q_doc_hi, False,
                                                     BLOCK_N, MASK)  # fmt: skip
        if visit:
            # (its own name: ``_`` holds a tile start in this loop, and Triton's compiler wants
            # one type per name across the branches)
            k, v, s, _cap_grad = _partial_scores(q, k_base, v_base, k_st, v_st, mask_args, b, h,
                                                 offs_m, row_ok, q_pos, q_doc, row_off, offs_k,
                                                 k_ok, k_doc, d_ok, qk_scale, MASK, DOT)  # fmt: skip
            m_i, l_i, acc = _masked_softmax_step(m_i, l_i, acc, s, v, DOT)

    out, lse = _softmax_result(m_i, l_i, acc)
    tl.store(STATE_LSE + state_row, lse, mask=row_ok)
    if LAST:
        f_ptrs = _head(FINAL_OUT, final_st, b, h) + offs_m[:, None] * final_st.s + offs_d[None, :]
        tl.store(f_ptrs, out.to(FINAL_OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(STATE_OUT + state_row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :], cache_modifier=".cs")  # fmt: skip
