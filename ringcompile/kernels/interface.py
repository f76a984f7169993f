"""The interface every block-attention implementation provides (see ``kernels/__init__.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ringcompile.masks import BlockMask


@dataclass
class ForwardState:
    """The ring's running result for its queries: always a valid normalised (out, lse) pair.

    Every implementation reads and writes this one form, so the steps of one call may be computed
    by different kernels (a fused plain kernel for one block, a masked one for the next)."""

    q_shape: torch.Size
    lse: torch.Tensor  # (B, H, Sq) log-sum-exp of the keys seen so far, accumulation dtype
    out: torch.Tensor | None = (
        None  # (B, H, Sq, D) contiguous normalised output, accumulation dtype
    )
    final_out: torch.Tensor | None = None  # (B, H, Sq, D) in q's dtype, written by a last step
    steps: int = 0  # steps merged so far; with none, ``out`` and ``lse`` hold nothing yet
    # (B, H, Sq, D) in q's dtype, any strides: a first block's output as a fused kernel returned
    # it, standing for ``out`` until a merge reads it (``BlockEngine`` only)
    pending: torch.Tensor | None = None


def finish_forward(state: ForwardState, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``forward_finish`` of every implementation: the state's output in ``dtype``."""
    if state.final_out is not None:
        return state.final_out.to(dtype), state.lse
    if state.steps == 0:  # no key was seen
        return state.lse.new_zeros(state.q_shape, dtype=dtype), state.lse.fill_(float("-inf"))
    return state.out.to(dtype), state.lse


class AttentionKernels(Protocol):
    def forward_init(self, q: torch.Tensor) -> ForwardState:
        """Accumulator state for the queries ``q`` (nothing seen yet)."""

    def forward_step(
        self,
        state: ForwardState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: BlockMask,
        scale: float,
        last: bool,
    ) -> None:
        """Merge attention of ``q`` over this key block into ``state`` in place.

        ``last`` is True on the last call before ``forward_finish`` (an implementation may fuse
        the normalisation into it); a rank that sees no key block at all makes no call, and
        ``forward_finish`` must then give out = 0, lse = -inf.
        """

    def forward_finish(
        self, state: ForwardState, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: out (B, H, Sq, D) in ``dtype``, any strides, lse (B, H, Sq)."""

    def backward_prepare(self, out: torch.Tensor, dout: torch.Tensor) -> Any:
        """What every ``backward_step`` needs of the output, made once per call: for flash-style
        kernels ``delta = rowsum(dout * out)`` (B, H, Sq) in the accumulation dtype."""

    def backward_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dout: torch.Tensor,
        lse: torch.Tensor,
        prepared: Any,
        mask: BlockMask,
        scale: float,
        dq: torch.Tensor,
        dk: torch.Tensor,
        dv: torch.Tensor,
        dkv_fresh: bool = False,
    ) -> None:
        """Add this key block's contributions to ``dq`` and ``dk``/``dv``: fp32 tensors added
        into in place (with ``dkv_fresh`` dK/dV hold nothing yet and are overwritten, so need no
        zeroing), or the ring's ``GradSum``s (``grad_sum.py``), which take a fused kernel's
        gradients as it returned them and give kernels that add in place their accumulators."""
