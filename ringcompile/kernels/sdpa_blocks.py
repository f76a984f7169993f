"""Plain blocks on aten's fused SDPA kernels: cuDNN on CUDA, the flash kernel on CPU.

A plain block (``ringcompile.blocks.Piece``) is full or top-left causal on a square: exactly what
SDPA's fused kernels compute. Through aten's private ops they also return the log-sum-exp the
ring's merge needs, take K/V with fewer heads than Q as they are (SDPA's GQA grouping), and their
backward takes the output and log-sum-exp it is given, so the ring hands every step's backward the
merged (global) output and lse, and gets that block's exact share of dq, dk and dv.

The cuDNN kernels are faster than our Triton kernels on plain blocks (benchmarks/RESULTS.md); they
return dq/dk/dv in the input dtype, which the ring adds into its fp32 accumulators.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

__all__ = ["PlainBlocks", "CudnnBlocks", "CpuFlashBlocks", "cudnn_runs"]


class PlainBlocks(Protocol):
    name: str

    def forward(self, q, k, v, causal: bool, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(out (B, H, n, D), lse (B, H, n))`` of one plain block (any strides)."""

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(dq, dk, dv)`` of the block, given the final ``out`` and ``lse`` of its rows."""


def cudnn_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's cuDNN attention takes blocks of this kind (checked without running it)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not torch.backends.cuda.cudnn_sdp_enabled():  # the user turned cuDNN attention off
        return False
    return _cudnn_device_ok(device.index if device.index is not None else
                            torch.cuda.current_device(), head_dim)  # fmt: skip


@functools.cache
def _cudnn_device_ok(index: int, head_dim: int) -> bool:
    if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
        return False
    major, _ = torch.cuda.get_device_capability(index)
    if major < 8:
        return False
    return head_dim % 8 == 0 and head_dim <= (256 if major >= 9 else 128)


@functools.cache
def _no_dropout_rng(device: torch.device) -> torch.Tensor:
    # the philox seed and offset of a call without dropout: read by no kernel, but typed
    return torch.zeros((), dtype=torch.int64, device=device)


class CudnnBlocks:
    name = "cudnn"

    def forward(self, q, k, v, causal, scale):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return res[0], res[1].squeeze(-1)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        # K/V as they travel (grouped): expanding them to the query heads gives cuDNN more
        # programs but ran 2-11 % slower on every ring block kind (bench_kernels.py --blocks)
        rng = _no_dropout_rng(q.device)
        # cuDNN reads the lse as a contiguous (B, H, n, 1): a row slice of the ring's is not
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), rng, rng, None, None, None,
            q.shape[2], k.shape[2], 0.0, causal, scale=scale,
        )  # fmt: skip


class CpuFlashBlocks:
    name = "flash (CPU)"

    def forward(self, q, k, v, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale
        )
