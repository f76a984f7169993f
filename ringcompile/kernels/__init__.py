"""Block attention kernels: the compute of one ring step, behind one interface.

The ring (``ringcompile.ring``) owns communication and the step loop; for the compute of each
step it calls an :class:`AttentionKernels` object:

forward, once per call::

    state = kernels.forward_init(q)
    for each ring step with a key block to see:
        kernels.forward_step(state, q, k, v, mask, scale, last=<is this the last step>)
    out, lse = kernels.forward_finish(state, q.dtype)

backward::

    prepared = kernels.backward_prepare(out, dout)       # e.g. rowsum(dout * out), fp32
    for each step: kernels.backward_step(q, k, v, dout, lse, prepared, mask, scale, dq, dk, dv)

Shapes: q, out, dout (B, H, Sq, D); k, v (B, Hkv, Sk, D) with query head i reading KV head
``i // (H // Hkv)`` (SDPA's GQA grouping); lse (B, H, Sq) in the accumulation dtype (float32 for
half types, float64 for float64); dq (B, H, Sq, D) and dk, dv (B, Hkv, Sk, D) are accumulators in
that dtype that ``backward_step`` adds into (or overwrites, with ``dkv_fresh=True``), or the
ring's gradient sums (``grad_sum.GradSum``), which hold a fused kernel's gradients as it returned
them and sum them in as few passes as the contributions allow. ``mask`` is a :class:`ringcompile.masks.BlockMask`. Rows
that see no key give out = 0, lse = -inf and zero grads (what SDPA's math backend gives).

Which kernel computes which kind of block is declared in ``registry.py`` (``KERNELS``), and one
planning function (``plan_kernels``) answers for the run and for ``explain``. ``select_kernels(q,
choice)`` gives the ``BlockEngine`` (``engine.py``) that sends each block to its kind's kernel:

- plain blocks (full or causal pieces): aten's fused SDPA kernels (``sdpa_blocks.py``: cuDNN on
  CUDA, flash on CPU) with ``choice="auto"`` wherever they take the inputs; so do chunked blocks
  that are one such square per chunk, as one batch of chunks (``engine.ChunkBatch``);
- masked blocks, and plain ones where no fused kernel runs: ``TritonKernels`` (``triton/``, masks
  evaluated per tile; CUDA half precision and float32), else ``ReferenceKernels``
  (``reference.py``: plain PyTorch, any dtype and device);
- ``choice="triton"`` or ``"reference"`` forces that kernel for every block it takes.

The choice comes from the ``kernels`` option of the backend or ``ring_attention``, else from the
environment variable ``RINGCOMPILE_KERNELS``, else "auto".
"""

from __future__ import annotations

import functools

import torch

from ringcompile.kernels.engine import BlockEngine
from ringcompile.kernels.interface import AttentionKernels, ForwardState
from ringcompile.kernels.reference import ReferenceKernels
from ringcompile.kernels.registry import (
    KERNEL_CHOICES,
    KernelPlan,
    plan_kernels,
    resolve_kernel_choice,
)

__all__ = [
    "AttentionKernels",
    "BlockEngine",
    "ForwardState",
    "KERNEL_CHOICES",
    "KernelPlan",
    "ReferenceKernels",
    "accumulation_dtype",
    "plan_kernels",
    "resolve_kernel_choice",
    "select_kernels",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def select_kernels(q: torch.Tensor, choice: str = "auto") -> BlockEngine:
    """The engine for queries like ``q``: each block kind on the kernel ``plan_kernels`` picks."""
    return _engine(plan_kernels(q.device, q.dtype, q.shape[-1], choice))


@functools.lru_cache(maxsize=64)
def _engine(plan: KernelPlan) -> BlockEngine:
    # one per plan: the engine and its kernels keep nothing of a call
    return BlockEngine(plan)
