"""The interface every block-attention implementation provides (see ``kernels/__init__.py``)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ringcompile.masks import BlockMask


class AttentionKernels(Protocol):
    def forward_init(self, q: torch.Tensor) -> Any:
        """Accumulator state for the queries ``q`` (nothing seen yet)."""

    def forward_step(
        self,
        state: Any,
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

    def forward_finish(self, state: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: out (B, H, Sq, D) contiguous in ``dtype``, lse (B, H, Sq)."""

    def backward_prepare(self, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        """``delta = rowsum(dout * out)`` (B, H, Sq) in the accumulation dtype."""

    def backward_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dout: torch.Tensor,
        lse: torch.Tensor,
        delta: torch.Tensor,
        mask: BlockMask,
        scale: float,
        dq: torch.Tensor,
        dk: torch.Tensor,
        dv: torch.Tensor,
        dkv_fresh: bool = False,
    ) -> None:
        """Add this key block's contributions into ``dq`` and ``dk``/``dv`` in place; with
        ``dkv_fresh`` dK/dV hold nothing yet and are overwritten (so need no zeroing)."""
