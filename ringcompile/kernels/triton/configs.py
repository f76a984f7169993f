"""How the kernels are launched: tile shapes (:class:`FwdConfig`, :class:`BwdConfig`) and their
tuned defaults, which way the backward adds dq, and how many heads one launch chunk holds.

Launch order. Grids are flat: chunks of a few heads, and inside a chunk tile after tile,
heaviest first under causal masks (``jit._tile_and_head``), so that no heavy tile starts last and
the programs running together share K/V in L2. The chunk sizes are chosen here from the SM count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

try:  # bulk reductions through the tensor-copy engine need Triton's host-side tensor descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

__all__ = ["FwdConfig", "BwdConfig"]


@dataclass(frozen=True)
class FwdConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int
    heads_per_chunk: int | None = None  # launch order (see _tile_and_head); None: _heads_per_chunk


@dataclass(frozen=True)
class BwdConfig:
    block_n: int  # keys per program (dk/dv rows held in registers)
    block_m: int  # query rows per inner iteration
    num_warps: int
    num_stages: int
    # dq: None = added by the dk/dv programs; else a separate kernel with one program per query
    # tile (no atomics, but Q·K^T and dO·V^T computed twice), tiled like the forward
    dq: FwdConfig | None = None
    heads_per_chunk: int | None = None  # of KV heads, dk/dv kernel; None: _kv_heads_per_chunk
    # with dq=None: each dq tile is added by one bulk reduction of the tensor-copy engine where the
    # GPU (Hopper on), Triton and dq's alignment allow it (_bulk_reduce_ok), else by fp32 atomics
    dq_bulk: bool = False


# Half-precision tiles were chosen on an H100 with ``benchmarks/bench_kernels.py --sweep``, and
# for ring steps ``benchmarks/bench_ring_sim.py --steps`` (see benchmarks/RESULTS.md); fp32 tiles
# are only sized to fit shared memory and registers: by padded head dim up to 64, 128 and 256.
_FWD_FP32 = (FwdConfig(64, 64, 4, 2), FwdConfig(64, 32, 4, 2), FwdConfig(32, 32, 4, 1))
_BWD_FP32 = (BwdConfig(64, 32, 4, 2), BwdConfig(32, 32, 4, 1), BwdConfig(32, 16, 4, 1))
# From this many queries and keys on, the forward at head dim 128 takes taller query tiles.
_LONG_BLOCK = 16384


def _head_dim_class(head_dim_padded: int) -> int:
    return 0 if head_dim_padded <= 64 else 1 if head_dim_padded <= 128 else 2


def default_fwd_config(head_dim_padded: int, dtype: torch.dtype, seq_q: int, seq_k: int,
                        last: bool = True, cuts_tiles: bool = False) -> FwdConfig:  # fmt: skip
    """``last``: the step writes the final output (a ring's other steps write the fp32 state);
    ``cuts_tiles``: the mask leaves few tiles whole (a window, chunks, documents) or changes every
    score (a dense mask or bias, a soft cap)."""
    if dtype == torch.float32:
        return _FWD_FP32[_head_dim_class(head_dim_padded)]
    if head_dim_padded <= 64:
        return FwdConfig(128, 128, 4, 3)
    if head_dim_padded <= 128:
        if last and cuts_tiles and min(seq_q, seq_k) < _LONG_BLOCK:
            # Smaller tiles, less of each cut by the mask's edges and fewer registers for the
            # per-score work: 6-24 % faster at 8k on documents, windows, chunks, ALiBi and soft
            # caps; key padding alone, whose tiles are mostly whole, ran 7 % slower so
            # (``bench_kernels.py --sweep-masks``, benchmarks/RESULTS.md).
            return FwdConfig(64, 64, 4, 3)
        if not last and min(seq_q, seq_k) <= _LONG_BLOCK:
            # Steps that store the fp32 state: smaller tiles in two stages (99 KB of shared
            # memory, two programs per SM) run them 4-10 % faster from 4k to 16k tokens; steps
            # that write the final output run 1-13 % slower so (benchmarks/RESULTS.md).
            return FwdConfig(128, 64, 4, 2)
        # taller query tiles halve the K/V reads; they pay off once each tile sees many keys
        if min(seq_q, seq_k) >= _LONG_BLOCK:
            return FwdConfig(256, 64, 8, 3)
        return FwdConfig(128, 128, 8, 3)
    return FwdConfig(64, 64, 4, 2)


def default_bwd_config(head_dim_padded: int, dtype: torch.dtype, banded: bool, bulk_ok: bool
                        ) -> BwdConfig:  # fmt: skip
    """``banded``: the mask has causal, window or chunk rules; ``bulk_ok``: dq allows bulk
    reductions."""
    if dtype == torch.float32:
        return _BWD_FP32[_head_dim_class(head_dim_padded)]
    if head_dim_padded <= 64:
        return BwdConfig(128, 64, 8, 2)
    if head_dim_padded <= 128:
        # Banded masks: dq by bulk reductions from the dk/dv programs (+4 to +6 % over the dq
        # kernel at 8k and 32k causal). Without bands every dq tile would take a reduction from
        # every key tile, and the dq kernel, which recomputes two dots but adds nothing
        # atomically, is 5 % faster; it also beat fp32 atomics.
        if banded and bulk_ok:
            return BwdConfig(128, 64, 8, 2, dq_bulk=True)
        return BwdConfig(128, 64, 8, 2, dq=FwdConfig(128, 128, 8, 3))
    # at 256 the dq tile pushes the dk/dv kernel into heavy spilling: dq gets its own kernel
    return BwdConfig(64, 32, 8, 1, dq=FwdConfig(64, 64, 4, 2))


def _bulk_reduce_available(device: torch.device) -> bool:
    """An NVIDIA GPU from Hopper on, and a Triton with tensor descriptors."""
    return (
        TensorDescriptor is not None
        and device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _bulk_reduce_ok(t: torch.Tensor) -> bool:
    """Whether the tensor-copy engine (TMA) can add tiles into ``t``: bulk reductions available,
    and 16-byte aligned base and strides."""
    return (
        _bulk_reduce_available(t.device)
        and t.data_ptr() % 16 == 0
        and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
    )


def _bulk_reduce_ok_fresh(shape, device: torch.device) -> bool:
    """``_bulk_reduce_ok`` of a new contiguous fp32 tensor of ``shape`` (a gradient sum's
    accumulator, before it is made): its strides are multiples of its last dim."""
    return _bulk_reduce_available(device) and shape[-1] * 4 % 16 == 0


_WAVES_PER_CHUNK = 4
# The dk/dv programs are few and long, and each streams the Q/dO of its group's query heads: two
# waves of them per chunk, in a power of two of KV heads, were 1-2 % faster than four waves at 8k
# keys and equal at 32k (benchmarks/RESULTS.md, sixth session).
_KV_WAVES_PER_CHUNK = 2


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _heads_per_chunk(cfg, n_tiles: int, n_heads: int, align: int, device: torch.device) -> int:
    """Heads per launch chunk of the forward and dq kernels: enough for a few waves of programs
    over the SMs, so that heavy tiles spread out, in whole groups of ``align`` heads (a GQA group
    shares K/V)."""
    if cfg.heads_per_chunk is not None:
        return max(1, min(cfg.heads_per_chunk, n_heads))
    # the interpreter runs one program at a time: small chunks there exercise the chunking
    sms = _sm_count(device.index) if device.type == "cuda" else 1
    need = triton.cdiv(triton.cdiv(_WAVES_PER_CHUNK * sms, n_tiles), align) * align
    return min(need, n_heads)


def _kv_heads_per_chunk(cfg, n_tiles: int, n_heads: int, device: torch.device) -> int:
    """KV heads per launch chunk of the dk/dv kernel: the largest power of two whose programs fill
    at most ``_KV_WAVES_PER_CHUNK`` waves (at least one head)."""
    if cfg.heads_per_chunk is not None:
        return max(1, min(cfg.heads_per_chunk, n_heads))
    sms = _sm_count(device.index) if device.type == "cuda" else 1
    fit = max(1, _KV_WAVES_PER_CHUNK * sms // n_tiles)
    return min(1 << (fit.bit_length() - 1), n_heads)
