"""What the kernels share: the exp2/log2 constants, how a tensor's strides travel as one
argument, the online softmax, the soft cap, the range of a tile's values, and the launch order of
a flat grid.

Every ``@triton.jit`` function here is inlined into the kernels that call it: a helper costs
nothing at run time, and its operations are emitted where the kernel's own would be.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ringcompile.masks import POSITION_NONE

_LOG2E = math.log2(math.e)
# the kernels' exp2/log2 units: log2(e) and ln(2) as compile-time constants
_LOG2E_K = tl.constexpr(_LOG2E)
_LN2_K = tl.constexpr(math.log(2.0))
# Position bounds of tiles are int64; +-_POS_HUGE stand for "no valid token" in a tile.
_POS_HUGE = tl.constexpr(POSITION_NONE)
# What a helper returns, beside other values, for a fact the mask lacks: Triton's compiler takes
# no None inside a returned tuple. Nothing reads it (the fact's flag is off).
_ABSENT = tl.constexpr(0)
# Passed to every launch: FP fusion (fused multiply-add) is what the kernels were checked and
# measured with. Triton 3.9 warns when it is left to its default, which 3.10 turns off.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def dot_precision(dtype: torch.dtype) -> str:
    """The input precision of dots of ``dtype`` operands (a kernel's ``DOT`` argument). For
    float32, as torch's own float32 matmuls and inductor's flex kernels take it: TF32 only where
    the user allowed it (``torch.backends.cuda.matmul.fp32_precision``, else
    ``set_float32_matmul_precision``); half types ignore it (Triton's default, "tf32")."""
    if dtype != torch.float32:
        return "tf32"
    chosen = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if chosen != "none":
        return "ieee" if chosen == "ieee" else "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


class _Strides(NamedTuple):
    """The batch, head and token strides of a (B, H, S[, D]) tensor (D contiguous), passed to a
    kernel as one tuple argument: Triton specialises each element as it would a lone integer.
    Argument tuples stay flat: Triton 3.6 loses the constant elements (integers equal to 1) of a
    tuple nested in another inside loops."""

    b: int
    h: int
    s: int


def _strides(t: torch.Tensor) -> _Strides:
    return _Strides(*t.stride()[:3])


@triton.jit
def _head(ptr, st, b, h):
    """The (batch ``b``, head ``h``) slice of a tensor with strides ``st`` (:class:`_Strides`):
    64-bit offsets, since the whole tensor may pass 2**31 elements."""
    return ptr + b.to(tl.int64) * st.b + h.to(tl.int64) * st.h


@triton.jit
def _range_of(x, ok, axis: tl.constexpr):
    """Smallest and largest of ``x`` where ``ok`` along ``axis`` (none: lo > hi). Two tiles whose
    ranges of document ids do not meet hold no (query, key) pair of one document, whatever the
    ids' order."""
    lo = tl.min(tl.where(ok, x, _POS_HUGE), axis=axis)
    hi = tl.max(tl.where(ok, x, -_POS_HUGE), axis=axis)
    return lo, hi


@triton.jit
def _soft_cap(s, cap, inv_cap, MODE: tl.constexpr):
    """``cap * tanh(s / cap)`` of scores ``s`` (log2 units, with ``cap`` in them; ``inv_cap`` its
    inverse) and its derivative ``1 - tanh^2``. MODE 1: tanh from exp2 (libdevice's is not in
    Triton's interpreter), absolute error ~1e-7, its limits +-1 exact; MODE 2: the GPU's
    ``tanh.approx.f32`` (relative error ~2**-11, as FlashAttention's soft cap), for half-precision
    inputs, whose own rounding is coarser."""
    x = s * inv_cap
    if MODE == 2:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)  # fmt: skip
    else:
        t = 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E_K)) + 1.0)
    return cap * t, 1.0 - t * t


@triton.jit
def _masked_softmax_step(m_i, l_i, acc, s, v, DOT: tl.constexpr):
    """One online-softmax step over a tile of scores ``s`` (log2 units, -inf where hidden) and
    its values: the running max, sum and unnormalised output after it. ``DOT``: the dots' input
    precision (``dot_precision``)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows that have seen no key yet keep max -inf; subtract 0 there instead to avoid NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
    return m_new, l_i, acc


@triton.jit
def _softmax_result(m_i, l_i, acc):
    """The normalised output and the log-sum-exp (natural units) of the running state; rows that
    saw no key get 0 and -inf."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2_K, float("-inf"))
    return out, lse


@triton.jit
def _tile_and_head(n_tiles, heads_per_chunk, n_heads, LAST_HEAVIEST: tl.constexpr):
    """This program's tile and head in a flat grid: (tile, batch * n_heads + head, batch, head).
    Chunk after chunk of ``heads_per_chunk`` heads, and inside a chunk tile after tile, heaviest
    first, heads fastest.

    Under causal masks tiles differ in work by up to n_tiles times: a heavy tile launched last
    runs alone at the end. Heavy-first inside a chunk spreads them; chunks keep the programs
    running together on few heads, whose K/V (or Q/dO) then stay in L2."""
    pid = tl.program_id(0)
    heads = tl.num_programs(0) // n_tiles
    chunk = pid // (heads_per_chunk * n_tiles)
    first = chunk * heads_per_chunk
    width = tl.minimum(heads_per_chunk, heads - first)
    r = pid - chunk * heads_per_chunk * n_tiles
    i = r // width
    if LAST_HEAVIEST:
        i = n_tiles - 1 - i
    bh = first + r % width
    return i, bh, bh // n_heads, bh % n_heads
