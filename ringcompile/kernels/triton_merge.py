"""The (out, lse) merge of ``kernels.merge`` as one Triton kernel (CUDA)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ringcompile.kernels.triton.jit import LAUNCH_OPTIONS


@triton.jit
def _merge_kernel(
    OLD, DST, LSE, BLK_OUT, BLK_LSE, start, Sq, n, H,
    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
    stride_bb, stride_bh, stride_bs, stride_lb, stride_lh, stride_ls,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    rows = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    row_ok = rows < n
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = BLK_OUT + b64 * stride_bb + h64 * stride_bh
    o_blk = tl.load(blk + rows[:, None] * stride_bs + offs_d[None, :], mask=ok, other=0.0)
    o_blk = o_blk.to(tl.float32)
    l_blk = tl.load(BLK_LSE + b64 * stride_lb + h64 * stride_lh + rows * stride_ls,
                    mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
    lse_ptrs = LSE + bh.to(tl.int64) * Sq + start + rows  # the lse is contiguous (B, H, Sq)
    dst = DST + b64 * stride_db + h64 * stride_dh + (start + rows)[:, None] * stride_ds
    dst = dst + offs_d[None, :]
    if FIRST:
        tl.store(dst, o_blk.to(DST.dtype.element_ty), mask=ok)
        tl.store(lse_ptrs, l_blk, mask=row_ok)
    else:
        old = OLD + b64 * stride_ob + h64 * stride_oh + (start + rows)[:, None] * stride_os
        o_old = tl.load(old + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        l_old = tl.load(lse_ptrs, mask=row_ok, other=0.0)
        m = tl.maximum(l_old, l_blk)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row that has seen no key yet, nor here
        w_old = tl.exp(l_old - m)
        w_blk = tl.exp(l_blk - m)
        total = w_old + w_blk  # 0 for such a row: its lse stays -inf and its output 0
        out = (o_old * w_old[:, None] + o_blk * w_blk[:, None]) / tl.where(total == 0, 1.0, total)[:, None]  # fmt: skip
        tl.store(dst, out.to(DST.dtype.element_ty), mask=ok)
        tl.store(lse_ptrs, m + tl.log(total), mask=row_ok)


def merge_block_cuda(old: torch.Tensor | None, dst: torch.Tensor, lse: torch.Tensor, start: int,
                     out_blk: torch.Tensor, lse_blk: torch.Tensor, first: bool) -> None:  # fmt: skip
    B, H, n, D = out_blk.shape
    Sq = lse.shape[2]
    if out_blk.stride(-1) != 1:
        out_blk = out_blk.contiguous()
    old = dst if old is None else old
    assert old.stride(-1) == 1 and dst.stride(-1) == 1 and lse.is_contiguous()
    block = 64
    # (a CPU tensor runs under Triton's interpreter: the tests')
    guard = torch.cuda.device(out_blk.device) if out_blk.is_cuda else contextlib.nullcontext()
    with guard:
        _merge_kernel[(triton.cdiv(n, block), B * H)](
            old, dst, lse, out_blk, lse_blk, start, Sq, n, H,
            old.stride(0), old.stride(1), old.stride(2),
            dst.stride(0), dst.stride(1), dst.stride(2),
            out_blk.stride(0), out_blk.stride(1), out_blk.stride(2),
            lse_blk.stride(0), lse_blk.stride(1), lse_blk.stride(2),
            HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK=block, FIRST=first,
            num_warps=4, **LAUNCH_OPTIONS,
        )  # fmt: skip
