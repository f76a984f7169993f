"""The block engine: the fastest kernel for each block of a ring step.

A ring step's block says what it is (``BlockMask.pieces``, from ``ringcompile.blocks``). Plain
pieces (full, or causal on a square) go to a fused SDPA kernel (``sdpa_blocks``: cuDNN on CUDA);
masked blocks (windows, documents, padding, a dense mask) go to the masked kernels (Triton on
CUDA, the reference elsewhere). Both write the one running state (``ForwardState``), so a call
may mix them step by step: the masked kernels merge inside their epilogue, a plain piece's
(out, lse) is merged by ``merge_block``.

Backward: a plain piece's fused backward takes the final (out, lse) of its rows and returns its
dq, dk, dv in the input dtype; they are added into the ring's accumulators (dq in fp32 here, dK/dV
in the accumulators that travel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringcompile.kernels.interface import AttentionKernels, ForwardState
from ringcompile.kernels.merge import merge_block
from ringcompile.kernels.sdpa_blocks import PlainBlocks
from ringcompile.masks import BlockMask

__all__ = ["BlockEngine"]


@dataclass
class _Prepared:
    """What the backward steps need of the output: itself for plain pieces, delta for masked
    blocks (made at the first masked block)."""

    out: torch.Tensor
    dout: torch.Tensor
    masked: AttentionKernels
    _delta: object = None

    @property
    def delta(self):
        if self._delta is None:
            self._delta = self.masked.backward_prepare(self.out, self.dout)
        return self._delta


class BlockEngine:
    """:class:`AttentionKernels` that computes plain pieces with ``plain`` and masked blocks with
    ``masked``."""

    def __init__(self, plain: PlainBlocks, masked: AttentionKernels):
        self.plain = plain
        self.masked = masked

    def forward_init(self, q: torch.Tensor) -> ForwardState:
        return self.masked.forward_init(q)

    def forward_step(self, state: ForwardState, q, k, v, mask: BlockMask, scale: float,
                     last: bool) -> None:  # fmt: skip
        pieces = mask.pieces
        if pieces is None:
            self.masked.forward_step(state, q, k, v, mask, scale, last)
            return
        if not pieces:
            return
        Sq = q.shape[2]
        whole_rows = (pieces[0].row_start, pieces[0].row_stop) == (0, Sq)
        if state.steps == 0 and last and len(pieces) == 1 and whole_rows:
            # the call's only block: the fused kernel's result is the answer
            p = pieces[0]
            out, lse = self.plain.forward(q, k[:, :, p.keys], v[:, :, p.keys], p.causal, scale)
            state.final_out = out.contiguous()
            state.lse = lse.to(state.lse.dtype).contiguous()
            state.steps = 1
            return
        first = False
        if state.steps == 0:
            if state.out is None:
                state.out = torch.empty(q.shape, dtype=state.lse.dtype, device=q.device)
            first = whole_rows  # the first piece fills every row; otherwise start from nothing
            if not first:
                state.out.zero_()
                state.lse.fill_(float("-inf"))
        for p in pieces:
            out, lse = self.plain.forward(q[:, :, p.rows], k[:, :, p.keys], v[:, :, p.keys],
                                          p.causal, scale)  # fmt: skip
            merge_block(state, p.row_start, out, lse, first)
            first = False
        state.steps += 1

    def forward_finish(self, state: ForwardState, dtype: torch.dtype):
        return self.masked.forward_finish(state, dtype)

    def backward_prepare(self, out: torch.Tensor, dout: torch.Tensor) -> _Prepared:
        return _Prepared(out, dout, self.masked)

    def backward_step(self, q, k, v, dout, lse, prepared: _Prepared, mask: BlockMask,
                      scale: float, dq, dk, dv, dkv_fresh: bool = False) -> None:  # fmt: skip
        pieces = mask.pieces
        if pieces is None:
            self.masked.backward_step(q, k, v, dout, lse, prepared.delta, mask, scale, dq, dk, dv,
                                      dkv_fresh)  # fmt: skip
            return
        Sk = k.shape[2]
        # fresh dK/dV are written by the first piece when it covers every key, else zeroed
        fresh = dkv_fresh and bool(pieces) and (pieces[0].key_start, pieces[0].key_stop) == (0, Sk)
        if dkv_fresh and not fresh:
            dk.zero_()
            dv.zero_()
        for p in pieces:
            rows, keys = p.rows, p.keys
            dq_p, dk_p, dv_p = self.plain.backward(
                dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                prepared.out[:, :, rows], lse[:, :, rows], p.causal, scale,
            )  # fmt: skip
            dq[:, :, rows] += dq_p
            if fresh:
                dk.copy_(dk_p)
                dv.copy_(dv_p)
                fresh = False
            else:
                dk[:, :, keys] += dk_p
                dv[:, :, keys] += dv_p
