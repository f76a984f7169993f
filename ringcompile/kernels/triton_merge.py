"""The (out, lse) merge of ``kernels.merge`` as one Triton kernel (CUDA)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ringcompile.kernels.interface import ForwardState


@triton.jit
def _merge_kernel(
    OUT, LSE, BLK_OUT, BLK_LSE, start, Sq, n, H,
    stride_bb, stride_bh, stride_bs, stride_lb, stride_lh, stride_ls,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tile * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    row_ok = rows < n
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = BLK_OUT + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
    o_blk = tl.load(blk + rows[:, None] * stride_bs + offs_d[None, :], mask=ok, other=0.0)
    o_blk = o_blk.to(tl.float32)
    l_blk = tl.load(BLK_LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
                    + rows * stride_ls, mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
    state_row = bh.to(tl.int64) * Sq + start + rows  # the state is contiguous (B, H, Sq[, D])
    out_ptrs = OUT + state_row[:, None] * HEAD_DIM + offs_d[None, :]
    if FIRST:
        tl.store(out_ptrs, o_blk, mask=ok)
        tl.store(LSE + state_row, l_blk, mask=row_ok)
    else:
        l_old = tl.load(LSE + state_row, mask=row_ok, other=0.0)
        o_old = tl.load(out_ptrs, mask=ok, other=0.0)
        m = tl.maximum(l_old, l_blk)  # l_blk is finite: so is m
        w_old = tl.exp(l_old - m)
        w_blk = tl.exp(l_blk - m)
        total = w_old + w_blk
        out = (o_old * w_old[:, None] + o_blk * w_blk[:, None]) / total[:, None]
        tl.store(out_ptrs, out, mask=ok)
        tl.store(LSE + state_row, m + tl.log(total), mask=row_ok)


def merge_block_cuda(state: ForwardState, start: int, out_blk: torch.Tensor,
                     lse_blk: torch.Tensor, first: bool) -> None:  # fmt: skip
    B, H, n, D = out_blk.shape
    Sq = state.lse.shape[2]
    if out_blk.stride(-1) != 1:
        out_blk = out_blk.contiguous()
    block = 64
    # (a CPU tensor runs under Triton's interpreter: the tests')
    guard = torch.cuda.device(out_blk.device) if out_blk.is_cuda else contextlib.nullcontext()
    with guard:
        _merge_kernel[(triton.cdiv(n, block), B * H)](
            state.out, state.lse, out_blk, lse_blk, start, Sq, n, H,
            out_blk.stride(0), out_blk.stride(1), out_blk.stride(2),
            lse_blk.stride(0), lse_blk.stride(1), lse_blk.stride(2),
            HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), BLOCK=block, FIRST=first,
            num_warps=4,
        )  # fmt: skip
