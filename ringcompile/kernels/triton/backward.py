"""The backward kernels of a ring step: delta = rowsum(dO * O), dK/dV (and dq) per key tile, and
dq per query tile.

One program per (key tile, batch, KV head) accumulates dk/dv in registers over the G query heads
of its group and over the query tiles in its lists (no K/V expansion, no race on dk/dv), then adds
them into the fp32 accumulators, or overwrites them (``dkv_fresh``: the ring's steps, whose dK/dV
are new each step, so nothing is zeroed or re-read; on a ring of one they are the answer, written
in the inputs' dtype). The travelling dK/dV passes once per step:
it is loaded evict-first and stored streaming, so it does not push reused Q/dO out of L2. dq
comes in one of three ways:
- from the same programs, each dq tile added by one bulk reduction of the tensor-copy engine
  (TMA; Hopper on): the default at head dim 128 in bf16/fp16 under causal or window masks;
- from the same programs, added with fp32 atomics: fp32, head dims up to 64, and the fallback
  where bulk reductions are not available;
- from a second kernel with one program per query tile that recomputes the scores: bf16/fp16 at
  128 without bands (no reduction traffic) and at 256 (where the dq tile would not fit in the
  dk/dv programs' registers); it owns its rows, so a fresh dq is written, not added (on a ring of
  one straight in the inputs' dtype).
Inside a step, dp = dO·V^T is computed before P·dO so that dv's dot runs while dS is formed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ringcompile.kernels.triton.forward import _load_kv, _partial_scores
from ringcompile.kernels.triton.jit import _LOG2E_K, _head, _soft_cap, _tile_and_head
from ringcompile.kernels.triton.mask_args import (
    _add_mask,
    _dense_keep,
    _listed_tile,
    _row_offsets,
    _row_tile_facts,
    _token_rules,
)


@triton.jit
def _delta_kernel(OUT, DO, DELTA, o_st, do_st, S, H, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = _head(OUT, o_st, b, h)
    do_ptrs = _head(DO, do_st, b, h)
    o = tl.load(o_ptrs + rows[:, None] * o_st.s + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptrs + rows[:, None] * do_st.s + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _bwd_block(
    k, v, dk, dv, Q, DO, LSE, DELTA, DQ, DQ_DESC, q_st, do_st, dq_st, b, h, bh, m0, rows, offs_d,
    Sq, row_ok, d_ok, keep, qk_scale, sm_scale, dense_bias, row_off,
    softcap, inv_softcap, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    DENSE_ADD: tl.constexpr, SOFTCAP: tl.constexpr, DQ_MODE: tl.constexpr, EARLY_DP: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """One (key tile, query tile) pair of the backward, transposed: rows are keys. The query tile
    is ``rows`` of head ``h`` (``bh``: batch * heads + h; ``m0``: its first row); ``row_ok``:
    which rows are inside the block, made here for full tiles (CHECK_ROWS off), where only a
    padded head dim's atomics read it.

    DQ_MODE: 0 = dq comes from _bwd_dq_kernel; 1 = added here by fp32 atomics; 2 = added here by
    one bulk reduction of the tile through the tensor-copy engine (``DQ_DESC``).
    """
    q_ptrs = _head(Q, q_st, b, h) + rows[:, None] * q_st.s + offs_d[None, :]
    do_ptrs = _head(DO, do_st, b, h) + rows[:, None] * do_st.s + offs_d[None, :]
    lse_ptrs = LSE + bh * Sq + rows
    delta_ptrs = DELTA + bh * Sq + rows
    dq_ptrs = _head(DQ, dq_st, b, h) + rows[:, None] * dq_st.s + offs_d[None, :]
    if not CHECK_ROWS:
        row_ok = rows < Sq
    if CHECK_ROWS:
        io_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)
        do = tl.load(do_ptrs, mask=io_mask, other=0.0)
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    elif EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    else:
        q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    # Rows that saw no key (lse = -inf) get probability 0 everywhere, hence zero gradients.
    m2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT) * qk_scale
    if SOFTCAP:
        s_t, cap_grad = _soft_cap(s_t, softcap, inv_softcap, SOFTCAP)
    if DENSE_ADD:
        s_t = _add_mask(s_t, dense_bias, row_off[None, :])
    if MASKED:
        s_t = tl.where(keep, s_t, float("-inf"))
    if EARLY_DP:
        # dp_t's dot (which waits for every dot in flight) before dv's: dv's dot then runs while
        # ds_t is formed. At head dim 256 holding dp_t that long costs more in spills.
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT)
        p_t = tl.exp2(s_t - m2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT)
    else:
        p_t = tl.exp2(s_t - m2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * cap_grad
    ds_t = ds_t.to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=DOT)
    if DQ_MODE != 0:
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT) * sm_scale
    if DQ_MODE == 2:
        DQ_DESC.atomic_add([b, h, m0, 0], tl.reshape(dq, [1, 1, dq.shape[0], dq.shape[1]]))
    elif DQ_MODE == 1:
        if EVEN_D and not CHECK_ROWS:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _write_dkv(base, offs_n, offs_d, stride_s, mask, value, ACCUMULATE: tl.constexpr):
    """Write one program's dK or dV tile (it alone owns these rows), or add it to what is there.
    Streamed once per step, like the forward's state: loaded evict-first, stored streaming, so
    the reused Q/dO tiles keep L2. The tile's pointers are made here, after the loops: made
    before, they would hold registers through them."""
    ptrs = base + offs_n[:, None] * stride_s + offs_d[None, :]
    if ACCUMULATE:
        value = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first") + value
    # (an overwritten tile may go straight into the inputs' dtype: rounded once, here)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask, cache_modifier=".cs")


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQ_DESC, DK, DV,
    q_st, k_st, v_st, do_st, dq_st, dk_st, dv_st, lists, mask_args,
    Sq, Sk, HKV, GROUP, qk_scale, sm_scale, heads_per_chunk,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK: tl.constexpr, DQ_MODE: tl.constexpr, ACCUMULATE: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    # under causal masks earlier key tiles are seen by more queries
    tile, _, b, hk = _tile_and_head(tl.cdiv(Sk, BLOCK_N), heads_per_chunk, HKV, LAST_HEAVIEST=False)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    n_full = tl.load(lists.full_count + tile)
    n_part = tl.load(lists.part_count + tile)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k_ok = offs_n < Sk
    d_ok = offs_d < HEAD_DIM
    kv_mask = k_ok[:, None] & d_ok[None, :]
    dk_base = _head(DK, dk_st, b, hk)
    dv_base = _head(DV, dv_st, b, hk)
    if n_full + n_part > 0:
        offs_m = tl.arange(0, BLOCK_M)
        k = tl.load(_head(K, k_st, b, hk) + offs_n[:, None] * k_st.s + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # fmt: skip
        v = tl.load(_head(V, v_st, b, hk) + offs_n[:, None] * v_st.s + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # fmt: skip
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

        # Full query tiles of every query head of this KV head's group, as one flat loop so that
        # the compiler pipelines across heads too.
        for it in range(GROUP * n_full):
            h = hk * GROUP + it // n_full
            m0 = tl.load(lists.full + tile * lists.stride + it % n_full) * BLOCK_M
            rows = m0 + offs_m
            bh = b.to(tl.int64) * HKV * GROUP + h
            dk, dv = _bwd_block(
                k, v, dk, dv, Q, DO, LSE, DELTA, DQ, DQ_DESC, q_st, do_st, dq_st, b, h, bh, m0,
                rows, offs_d, Sq, None, d_ok, None, qk_scale, sm_scale, None, None, None, None,
                CHECK_ROWS=False, EVEN_D=EVEN_D, MASKED=False, DENSE_ADD=False, SOFTCAP=0,
                DQ_MODE=DQ_MODE, EARLY_DP=D_PAD <= 128, DOT=DOT,
            )  # fmt: skip

        k_pos = tl.load(mask_args.k_pos + offs_n, mask=k_ok, other=0).to(tl.int32)
        k_doc, k_doc_lo, k_doc_hi, k_valid = _row_tile_facts(mask_args, b, offs_n, k_ok, False,
                                                             MASK)  # fmt: skip
        for it in range(GROUP * n_part):
            h = hk * GROUP + it // n_part
            m0, rows, row_ok, q_doc, visit = _listed_tile(
                lists.part + tile * lists.stride + it % n_part,
                offs_m,
                Sq,
                mask_args,
                b,
                k_doc_lo,
                k_doc_hi,
                True,
                BLOCK_M,
                MASK,
            )
            if visit:
                bh = b.to(tl.int64) * HKV * GROUP + h
                q_pos = tl.load(mask_args.q_pos + rows, mask=row_ok, other=0).to(tl.int32)
                keep = _token_rules(q_pos, k_pos, mask_args, q_doc, k_doc, k_valid, False,
                                    MASK) & k_ok[:, None]  # fmt: skip
                keep, dense_bias = _dense_keep(keep, mask_args, b, h, rows, row_ok, offs_n, k_ok,
                                               False, MASK)  # fmt: skip
                row_off = _row_offsets(mask_args, b, h, rows, row_ok, MASK)
                dk, dv = _bwd_block(
                    k, v, dk, dv, Q, DO, LSE, DELTA, DQ, DQ_DESC, q_st, do_st, dq_st, b, h, bh, m0,
                    rows, offs_d, Sq, row_ok, d_ok, keep, qk_scale, sm_scale, dense_bias, row_off,
                    mask_args.softcap, mask_args.inv_softcap, CHECK_ROWS=True, EVEN_D=EVEN_D, MASKED=True,
                    DENSE_ADD=MASK.dense_kind == 2, SOFTCAP=MASK.softcap, DQ_MODE=DQ_MODE,
                    EARLY_DP=D_PAD <= 128, DOT=DOT,
                )  # fmt: skip

        _write_dkv(dk_base, offs_n, offs_d, dk_st.s, kv_mask, dk * sm_scale, ACCUMULATE)
        _write_dkv(dv_base, offs_n, offs_d, dv_st.s, kv_mask, dv, ACCUMULATE)
    elif not ACCUMULATE:
        # no query sees these keys; an overwritten accumulator still needs its zeros
        zeros = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        _write_dkv(dk_base, offs_n, offs_d, dk_st.s, kv_mask, zeros, False)
        _write_dkv(dv_base, offs_n, offs_d, dv_st.s, kv_mask, zeros, False)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, q_st, k_st, v_st, do_st, dq_st, lists, mask_args,
    Sq, Sk, H, GROUP, qk_scale, sm_scale, heads_per_chunk,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, DOT: tl.constexpr, DQ_FRESH: tl.constexpr,
):  # fmt: skip
    """dq of one query tile over the key tiles of its lists (the forward's loop, recomputed),
    added to DQ, or with ``DQ_FRESH`` written over it (in DQ's dtype: a sum's sole
    contribution may be the answer itself)."""
    tile, bh, b, h = _tile_and_head(tl.cdiv(Sq, BLOCK_M), heads_per_chunk, H, LAST_HEAVIEST=True)
    hk = h // GROUP
    n_full = tl.load(lists.full_count + tile)
    n_part = tl.load(lists.part_count + tile)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    # One program per (query tile, head): plain writes, no atomics.
    dq_ptrs = _head(DQ, dq_st, b, h) + offs_m[:, None] * dq_st.s + offs_d[None, :]
    if n_full + n_part > 0:
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(_head(Q, q_st, b, h) + offs_m[:, None] * q_st.s + offs_d[None, :],
                    mask=io_mask, other=0.0)  # fmt: skip
        do = tl.load(_head(DO, do_st, b, h) + offs_m[:, None] * do_st.s + offs_d[None, :],
                     mask=io_mask, other=0.0)  # fmt: skip
        lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=row_ok, other=float("inf"))
        m2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)
        delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=row_ok, other=0.0)
        k_base = _head(K, k_st, b, hk) + offs_d[None, :]
        v_base = _head(V, v_st, b, hk) + offs_d[None, :]
        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for i in range(n_full):
            offs_k = tl.load(lists.full + tile * lists.stride + i) * BLOCK_N + offs_n
            k, v = _load_kv(k_base, v_base, k_st, v_st, offs_k, None, d_ok, False,
                            HEAD_DIM == D_PAD)  # fmt: skip
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale - m2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT)
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += tl.dot(ds, k, input_precision=DOT)

        q_pos = tl.load(mask_args.q_pos + offs_m, mask=row_ok, other=0).to(tl.int32)
        q_doc, q_doc_lo, q_doc_hi, _ = _row_tile_facts(mask_args, b, offs_m, row_ok, True, MASK)
        row_off = _row_offsets(mask_args, b, h, offs_m, row_ok, MASK)
        for i in range(n_part):
            _, offs_k, k_ok, k_doc, visit = _listed_tile(
                lists.part + tile * lists.stride + i,
                offs_n,
                Sk,
                mask_args,
                b,
                q_doc_lo,
                q_doc_hi,
                False,
                BLOCK_N,
                MASK,
            )
            if visit:
                k, v, s, cap_grad = _partial_scores(q, k_base, v_base, k_st, v_st, mask_args, b, h,
                                                    offs_m, row_ok, q_pos, q_doc, row_off, offs_k,
                                                    k_ok, k_doc, d_ok, qk_scale, MASK, DOT)  # fmt: skip
                p = tl.exp2(s - m2[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=DOT)
                ds = p * (dp - delta[:, None])
                if MASK.softcap:
                    ds = ds * cap_grad
                ds = ds.to(k.dtype)
                dq += tl.dot(ds, k, input_precision=DOT)

        dq = dq * sm_scale
        if not DQ_FRESH:
            dq += tl.load(dq_ptrs, mask=io_mask, other=0.0)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)
    elif DQ_FRESH:  # no key for these rows; an overwritten dq still needs its zeros
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, D_PAD], DQ.dtype.element_ty), mask=io_mask)
