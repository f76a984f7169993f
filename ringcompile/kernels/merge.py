"""Merging one block's (out, lse) into the ring's running state (``ForwardState``).

Kernels that compute a block on its own (the fused SDPA kernels of ``sdpa_blocks``) return the
block's normalised output and log-sum-exp; the ring's state is the same pair over every key seen so
far. Merging rows ``[start, start + n)``::

    lse' = logaddexp(lse, lse_blk)
    out' = out * exp(lse - lse') + out_blk * exp(lse_blk - lse')

On CUDA this is one Triton kernel (``triton_merge``): one read of the block's output and one
read-modify-write of the fp32 state. Elsewhere it is these torch ops. A block's rows always see at
least one key (its lse is finite), so the merged lse is finite and no weight is NaN.
"""

from __future__ import annotations

import torch

from ringcompile.kernels.interface import ForwardState

__all__ = ["merge_block"]


def merge_block(state: ForwardState, start: int, out_blk: torch.Tensor, lse_blk: torch.Tensor,
                first: bool) -> None:  # fmt: skip
    """Merge a block's ``out_blk`` (B, H, n, D) and ``lse_blk`` (B, H, n) into the state's rows
    ``[start, start + n)``; ``first``: those rows hold nothing yet and are overwritten."""
    if out_blk.is_cuda:
        from ringcompile.kernels.triton_merge import merge_block_cuda  # imports triton on CUDA only

        merge_block_cuda(state, start, out_blk, lse_blk, first)
        return
    rows = slice(start, start + out_blk.shape[2])
    out, lse = state.out[:, :, rows], state.lse[:, :, rows]
    lse_blk = lse_blk.to(lse.dtype)
    if first:
        out.copy_(out_blk)
        lse.copy_(lse_blk)
        return
    new = torch.logaddexp(lse, lse_blk)
    out.mul_(torch.exp(lse - new)[..., None]).add_(out_blk * torch.exp(lse_blk - new)[..., None])
    lse.copy_(new)
