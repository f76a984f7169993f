"""Merging one block's (out, lse) into the ring's running output (``ForwardState``).

Kernels that compute a block on its own (the fused SDPA kernels of ``sdpa_blocks``) return the
block's normalised output and log-sum-exp; the ring's state is the same pair over every key seen so
far. Merging rows ``[start, start + n)``::

    lse' = logaddexp(lse, lse_blk)
    out' = out * exp(lse - lse') + out_blk * exp(lse_blk - lse')

computed in the accumulation dtype. The running output is read from ``old`` and written to ``dst``:
the fp32 state for both, or the first block's output still in the inputs' dtype read and the fp32
state written (no copy of it first), or the output in the inputs' dtype written at the last step
(no conversion pass after). ``dst`` may be ``old``: each element is read and written by one
program. On CUDA this is one Triton kernel (``triton_merge``); elsewhere these torch ops. A row may see
no key in a block (lse -inf: a documents block) and none before it: it then stays (0, -inf), not
NaN.
"""

from __future__ import annotations

import torch

__all__ = ["merge_block"]


def merge_block(old: torch.Tensor | None, dst: torch.Tensor, lse: torch.Tensor, start: int,
                out_blk: torch.Tensor, lse_blk: torch.Tensor, first: bool) -> None:  # fmt: skip
    """Merge a block's ``out_blk`` (B, H, n, D) and ``lse_blk`` (B, H, n) with rows
    ``[start, start + n)`` of ``old`` and ``lse`` (B, H, Sq) into the same rows of ``dst`` and
    ``lse``. ``first``: those rows hold nothing yet (``old`` is not read) and are overwritten."""
    if out_blk.is_cuda:
        from ringcompile.kernels.triton_merge import merge_block_cuda  # imports triton on CUDA only

        merge_block_cuda(old, dst, lse, start, out_blk, lse_blk, first)
        return
    rows = slice(start, start + out_blk.shape[2])
    lse_rows = lse[:, :, rows]
    if first:
        dst[:, :, rows].copy_(out_blk)
        lse_rows.copy_(lse_blk)
        return
    lse_blk = lse_blk.to(lse.dtype)
    new = torch.logaddexp(lse_rows, lse_blk)
    seen = new.masked_fill(new == float("-inf"), 0)  # rows with no key so far: weights 0, not NaN
    merged = (old[:, :, rows].to(lse.dtype) * torch.exp(lse_rows - seen)[..., None]
              + out_blk.to(lse.dtype) * torch.exp(lse_blk - seen)[..., None])  # fmt: skip
    dst[:, :, rows].copy_(merged)
    lse_rows.copy_(new)
