"""Which kernel computes which block: every block kernel declares, as data, what it takes.

A ring step's block is of one kind (``block_kind``): "plain" (full or causal pieces: what fused
SDPA kernels compute), "varlen" (documents with position rules, positions in one progression on
both sides: a batch of variable-length problems, ``varlen.Segments``) or "masked" (rules per
element: windows and chunks, key padding, a dense mask, zigzag's two chunks; and the varlen
blocks a varlen kernel cannot take). A kernel's ``KernelSpec`` says which kinds, devices, dtypes and head dims it takes,
and whether it merges each block into the ring's running state itself (``AttentionKernels``) or
returns each piece's (out, lse) for the engine to merge (``PlainBlocks``,
``varlen.VarlenBlocks``). ``plan_kernels`` picks one kernel per kind, the first in ``KERNELS``
that takes the inputs; the run (``select_kernels``) and ``explain`` (``KernelPlan.names``) both
read that one answer.

Adding a kernel: its own module, and one ``KernelSpec`` in ``KERNELS`` (its place in the list is
its preference).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ringcompile.kernels.sdpa_blocks import CpuFlashBlocks, CudnnBlocks, cudnn_runs
from ringcompile.kernels.varlen import FlashVarlenBlocks, flash_varlen_runs

__all__ = [
    "BLOCK_KINDS",
    "KERNELS",
    "KERNEL_CHOICES",
    "KernelPlan",
    "KernelSpec",
    "block_kind",
    "mask_kind",
    "plan_kernels",
    "resolve_kernel_choice",
]

BLOCK_KINDS = ("plain", "varlen", "masked")
_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = _HALF | {torch.float32, torch.float64}


@dataclass(frozen=True)
class KernelSpec:
    name: str  # what explain prints
    kinds: frozenset[str]  # block kinds it computes
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_head_dim: int
    merges: bool  # True: an AttentionKernels (merges into the state); False: a PlainBlocks
    make: Callable[[], object]
    # what the data above cannot say: the library's own limits, the user's switches
    runs: Callable[[torch.device, torch.dtype, int], bool] | None = None

    def takes(self, kind: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return (kind in self.kinds and device.type in self.devices and dtype in self.dtypes
                and head_dim <= self.max_head_dim
                and (self.runs is None or self.runs(device, dtype, head_dim)))  # fmt: skip


def _triton_kernels():
    from ringcompile.kernels.triton import TritonKernels  # imports triton only when used

    return TritonKernels()


def _reference_kernels():
    from ringcompile.kernels.reference import ReferenceKernels

    return ReferenceKernels()


KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec(
        "cudnn",
        frozenset({"plain"}),
        frozenset({"cuda"}),
        _HALF,
        256,
        False,
        CudnnBlocks,
        runs=cudnn_runs,
    ),  # fmt: skip
    KernelSpec(
        "flash (CPU)",
        frozenset({"plain"}),
        frozenset({"cpu"}),
        _FLOATS,
        2**31,
        False,
        CpuFlashBlocks,
    ),  # fmt: skip
    KernelSpec(
        "flash varlen",
        frozenset({"varlen"}),
        frozenset({"cuda"}),
        _HALF,
        256,
        False,
        FlashVarlenBlocks,
        runs=flash_varlen_runs,
    ),  # fmt: skip
    KernelSpec(
        "triton",
        frozenset(BLOCK_KINDS),
        frozenset({"cuda"}),
        _HALF | {torch.float32},
        256,
        True,
        _triton_kernels,
    ),  # fmt: skip
    KernelSpec(
        "reference",
        frozenset(BLOCK_KINDS),
        frozenset({"cpu", "cuda"}),
        _FLOATS,
        2**31,
        True,
        _reference_kernels,
    ),  # fmt: skip
)
# A kernel that leaves the merge to the engine takes one kind, plain or varlen; a varlen block
# it cannot take goes to the masked kind's kernel, which merges.
assert all(spec.merges or spec.kinds in ({"plain"}, {"varlen"}) for spec in KERNELS)
assert all(spec.merges for spec in KERNELS if "masked" in spec.kinds)

# "auto", or a kernel that takes every kind, forced for every block it takes
KERNEL_CHOICES = ("auto",) + tuple(s.name for s in KERNELS if s.kinds == set(BLOCK_KINDS))


def block_kind(pieces, varlen: bool = False) -> str:
    """The kind of a block from its plain pieces (``BlockMask.pieces``; None: not plain) and
    whether it is a batch of variable-length problems (``BlockMask.varlen``)."""
    if pieces is not None:
        return "plain"
    return "varlen" if varlen else "masked"


def mask_kind(mask) -> str:
    """``block_kind`` of a ring step's ``BlockMask``."""
    return block_kind(mask.pieces, mask.varlen)


@dataclass(frozen=True)
class KernelPlan:
    """The kernel of each block kind, for one kind of query (device, dtype, head dim)."""

    kernels: tuple[KernelSpec, ...]  # in BLOCK_KINDS' order

    def spec(self, kind: str) -> KernelSpec:
        return self.kernels[BLOCK_KINDS.index(kind)]

    def names(self) -> dict[str, str]:
        return {kind: spec.name for kind, spec in zip(BLOCK_KINDS, self.kernels)}

    @property
    def fused_plain(self) -> bool:
        """Whether plain pieces go to a fused SDPA kernel: it returns gradients in the inputs'
        dtype and prepares nothing per call (so a part of the heads is as cheap as the whole)."""
        return not self.spec("plain").merges


def plan_kernels(device: torch.device, dtype: torch.dtype, head_dim: int,
                 choice: str = "auto") -> KernelPlan:  # fmt: skip
    """Per block kind, the first kernel that takes such queries: among all (``choice="auto"``),
    else the chosen one, then the kernels that merge (where the chosen one does not run)."""
    if choice == "auto":
        candidates = KERNELS
    else:
        candidates = [s for s in KERNELS if s.name == choice] + [s for s in KERNELS if s.merges]
    return KernelPlan(tuple(
        next(s for s in candidates if s.takes(kind, device, dtype, head_dim))
        for kind in BLOCK_KINDS
    ))  # fmt: skip


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
