"""Block attention kernels: the compute of one ring step, behind one interface.

The ring op (``ringcompile.ring_op``) owns communication and the step loop; for the compute of each
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

Implementations, chosen per call by ``select_kernels(q, choice)``:

- ``BlockEngine`` (``engine.py``): each block on the fastest kernel for it: plain blocks (full or
  causal) on aten's fused SDPA kernels (cuDNN on CUDA, flash on CPU), masked blocks on the masked
  kernels below; ``choice="auto"`` wherever the fused kernel takes the inputs;
- ``TritonKernels`` (``triton_flash.py``): every block in Triton, masks evaluated per tile; CUDA
  half precision and float32 (``choice="triton"`` forces it for every block);
- ``ReferenceKernels`` (``reference.py``): plain PyTorch, any dtype and device
  (``choice="reference"``; float64 on CUDA).

The choice comes from the ``kernels`` option of the backend or ``ring_attention``, else from the
environment variable ``RINGCOMPILE_KERNELS``, else "auto".
"""

from __future__ import annotations

import os

import torch

from ringcompile.kernels.engine import BlockEngine
from ringcompile.kernels.interface import AttentionKernels, ForwardState
from ringcompile.kernels.reference import ReferenceKernels
from ringcompile.kernels.sdpa_blocks import CpuFlashBlocks, CudnnBlocks, PlainBlocks, cudnn_runs

__all__ = [
    "AttentionKernels",
    "BlockEngine",
    "ForwardState",
    "KERNEL_CHOICES",
    "ReferenceKernels",
    "accumulation_dtype",
    "kernel_names",
    "kernels_fuse_plain",
    "resolve_kernel_choice",
    "select_kernels",
]

KERNEL_CHOICES = ("auto", "triton", "reference")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def resolve_kernel_choice(choice: str | None) -> str:
    """The option if given, else ``RINGCOMPILE_KERNELS``, else "auto"; checked."""
    if choice is None:
        choice = os.environ.get("RINGCOMPILE_KERNELS") or "auto"
        where = "RINGCOMPILE_KERNELS"
    else:
        where = "kernels"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{where}={choice!r} is not one of {list(KERNEL_CHOICES)}")
    return choice


def _plain_blocks(device: torch.device, dtype: torch.dtype, head_dim: int,
                  choice: str) -> PlainBlocks | None:  # fmt: skip
    if choice != "auto":
        return None
    if device.type == "cpu":
        return CpuFlashBlocks()
    if cudnn_runs(device, dtype, head_dim):
        return CudnnBlocks()
    return None


def _masked_is_triton(device: torch.device, dtype: torch.dtype, choice: str) -> bool:
    return choice != "reference" and device.type == "cuda" and dtype != torch.float64


def kernel_names(device: torch.device, dtype: torch.dtype, head_dim: int,
                 choice: str) -> tuple[str | None, str]:  # fmt: skip
    """(kernel for plain blocks or None, kernel for masked blocks) that ``select_kernels`` picks
    for such queries: what ``explain`` reports."""
    plain = _plain_blocks(device, dtype, head_dim, choice)
    masked = "triton" if _masked_is_triton(device, dtype, choice) else "reference"
    return (plain.name if plain is not None else None), masked


def select_kernels(q: torch.Tensor, choice: str = "auto") -> AttentionKernels:
    if _masked_is_triton(q.device, q.dtype, choice):
        from ringcompile.kernels.triton_flash import TritonKernels  # imports triton only when needed

        masked: AttentionKernels = TritonKernels()
    else:
        masked = ReferenceKernels()
    plain = _plain_blocks(q.device, q.dtype, q.shape[-1], choice)
    return BlockEngine(plain, masked) if plain is not None else masked


def kernels_fuse_plain(kernels: AttentionKernels) -> bool:
    """Whether ``kernels`` (from ``select_kernels``) hands plain pieces to a fused SDPA kernel,
    whose backward prepares nothing per call, so a part of the heads is as cheap as the whole."""
    return isinstance(kernels, BlockEngine)
