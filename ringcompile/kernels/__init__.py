"""Block attention kernels: the compute of one ring step, behind one interface.

The ring op (``ringcompile.ring_op``) owns communication and the step loop; for the compute of each
step it calls an :class:`AttentionKernels` object:

forward, once per call::

    state = kernels.forward_init(q)
    for each ring step with a key block to see:
        kernels.forward_step(state, q, k, v, mask, scale, last=<is this the last step>)
    out, lse = kernels.forward_finish(state, q.dtype)

backward::

    delta = kernels.backward_prepare(out, dout)          # rowsum(dout * out), fp32
    for each step: kernels.backward_step(q, k, v, dout, lse, delta, mask, scale, dq, dk, dv)

Shapes: q, out, dout (B, H, Sq, D); k, v (B, Hkv, Sk, D) with query head i reading KV head
``i // (H // Hkv)`` (SDPA's GQA grouping); lse, delta (B, H, Sq) in the accumulation dtype
(float32 for half types, float64 for float64); dq (B, H, Sq, D) and dk, dv (B, Hkv, Sk, D) are
accumulators in that dtype that ``backward_step`` adds into (or overwrites, with
``dkv_fresh=True``: the ring's per-step dK/dV then need no zeroing). ``mask`` is a
:class:`ringcompile.masks.BlockMask`. Rows that see no key give out = 0, lse = -inf and zero grads
(what SDPA's math backend gives).

``select_kernels(q)`` picks the implementation: the Triton kernels for CUDA half-precision and float32
inputs, the PyTorch reference elsewhere (CPU, float64, or wherever ``RINGCOMPILE_KERNELS=reference``
asks for it).
"""

from __future__ import annotations

import os

import torch

from ringcompile.kernels.interface import AttentionKernels
from ringcompile.kernels.reference import ReferenceKernels

__all__ = ["AttentionKernels", "ReferenceKernels", "select_kernels", "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def select_kernels(q: torch.Tensor) -> AttentionKernels:
    choice = os.environ.get("RINGCOMPILE_KERNELS", "auto")
    if choice == "reference" or q.device.type != "cuda" or q.dtype == torch.float64:
        return ReferenceKernels()
    from ringcompile.kernels.triton_flash import TritonKernels  # imports triton only when needed

    return TritonKernels()
