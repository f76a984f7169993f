"""Ring-step flash attention in Triton: the :class:`AttentionKernels` interface on CUDA.

Forward state. ``forward_step`` keeps the partial result *normalised*: an fp32 output ``out`` and
its log-sum-exp ``lse``. A step starts its online softmax from (running max = lse, running sum = 1,
accumulator = out), which is exact, and normalises again at its end, so the state is always a valid
(out, lse) pair. The first step reads no state; the last step (``last=True``) writes the output
straight in the input dtype instead of fp32, so a one-step call is a plain flash-attention forward
with no fp32 round trip. The state (and the backward's travelling dK/dV) passes once per step:
it is loaded evict-first and stored streaming, so it does not push reused K/V or Q/dO out of L2.

Masks. Each step receives per-token facts (:class:`ringcompile.masks.BlockMask`). Before the
attention kernel, two small kernels compute for every tile of the "row" side (query tiles in the
forward, key tiles in the backward) two lists of tiles of the other side: tiles that are *full*
(every pair visible: checked with per-tile min/max of the positions, so positions need not be
contiguous or sorted) and tiles that are *partial* (some pair may be visible). Tiles proven empty
are in neither list and cost nothing. Full tiles run without any mask arithmetic; partial tiles
evaluate the rules per element. Document ids and key validity enter the lists too, through each
tile's range of them: a tile pair inside one document with only valid keys is full, one that
shares no document or holds no valid key is skipped, so packed documents and padded batches run
mostly full tiles; with several batch rows a tile is full or skipped only if it is so in every
row. A dense mask is only checked per element: with one, every non-empty tile is partial. One
kernel launch makes a mask's lists; lists made from facts are made each call (facts are data).

Launch order. Grids are flat: chunks of a few heads, and inside a chunk tile after tile,
heaviest first under causal masks (``_tile_and_head``), so that no heavy tile starts last and the
programs running together share K/V in L2. The tile lists of the ring's masks by positions, which
repeat every call, are cached (``_TileListCache``): the host launches only the attention kernel.

Backward. One program per (key tile, batch, KV head) accumulates dk/dv in registers over the G
query heads of its group and over the query tiles in its lists (no K/V expansion, no race on
dk/dv), then adds them into the fp32 accumulators, or overwrites them (``dkv_fresh``: the ring's
steps, whose dK/dV are new each step, so nothing is zeroed or re-read). dq comes in one of three
ways:
- from the same programs, each dq tile added by one bulk reduction of the tensor-copy engine
  (TMA; Hopper on): the default at head dim 128 in bf16/fp16 under causal or window masks;
- from the same programs, added with fp32 atomics: fp32, head dims up to 64, and the fallback
  where bulk reductions are not available;
- from a second kernel with one program per query tile that recomputes the scores: bf16/fp16 at
  128 without bands (no reduction traffic) and at 256 (where the dq tile would not fit in the
  dk/dv programs' registers).
Inside a step, dp = dO·V^T is computed before P·dO so that dv's dot runs while dS is formed.

Precision. Operands of the dots are the input dtype; for bf16/fp16 the dots accumulate in fp32 and
the probabilities are rounded to the input dtype before P·V (as FlashAttention does); for fp32
inputs the dots use TF32 (Triton's default ``input_precision``), about 3e-4 relative error.
Softmax, running statistics, lse, delta and all gradient accumulators are fp32.

Limits: head dims up to 256 (padded to a power of two inside the kernel with masked loads);
positions, ``seq_len`` and window sizes are compared in int32 inside tiles, so positions must be
below 2**31; one head's slice of a tensor must have fewer than 2**31 elements.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # bulk reductions through the tensor-copy engine need Triton's host-side tensor descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from ringcompile.kernels.grad_sum import accumulators
from ringcompile.kernels.interface import ForwardState, finish_forward
from ringcompile.masks import POSITION_NONE, BlockMask

__all__ = ["TritonKernels", "FwdConfig", "BwdConfig"]

_LOG2E = math.log2(math.e)
# the kernels' exp2/log2 units: log2(e) and ln(2) as compile-time constants
_LOG2E_K = tl.constexpr(_LOG2E)
_LN2_K = tl.constexpr(math.log(2.0))
_INT32_MAX = 2**31 - 1
# Position bounds of tiles are int64; +-_POS_HUGE stand for "no valid token" in a tile.
_POS_HUGE = tl.constexpr(POSITION_NONE)


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
# are only sized to fit shared memory and registers.
# From this many queries and keys on, the forward at head dim 128 takes taller query tiles.
_LONG_BLOCK = 16384


def _default_fwd_config(head_dim_padded: int, dtype: torch.dtype, seq_q: int, seq_k: int,
                        last: bool = True) -> FwdConfig:  # fmt: skip
    """``last``: the step writes the final output (a ring's other steps write the fp32 state)."""
    if dtype == torch.float32:
        if head_dim_padded <= 64:
            return FwdConfig(64, 64, 4, 2)
        if head_dim_padded <= 128:
            return FwdConfig(64, 32, 4, 2)
        return FwdConfig(32, 32, 4, 1)
    if head_dim_padded <= 64:
        return FwdConfig(128, 128, 4, 3)
    if head_dim_padded <= 128:
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


def _default_bwd_config(head_dim_padded: int, dtype: torch.dtype, banded: bool, bulk_ok: bool
                        ) -> BwdConfig:  # fmt: skip
    """``banded``: the mask has causal, window or chunk rules; ``bulk_ok``: dq allows bulk
    reductions."""
    if dtype == torch.float32:
        if head_dim_padded <= 64:
            return BwdConfig(64, 32, 4, 2)
        if head_dim_padded <= 128:
            return BwdConfig(32, 32, 4, 1)
        return BwdConfig(32, 16, 4, 1)
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


def _bulk_reduce_ok(t: torch.Tensor) -> bool:
    """Whether the tensor-copy engine (TMA) can add tiles into ``t``: an NVIDIA GPU from Hopper on,
    a Triton with tensor descriptors, and 16-byte aligned base and strides."""
    return (
        TensorDescriptor is not None
        and t.is_cuda
        and torch.version.hip is None
        and torch.cuda.get_device_capability(t.device)[0] >= 9
        and t.data_ptr() % 16 == 0
        and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
    )


# ---------------------------------------------------------------------------------------------
# Tile lists: which tiles of the other side each row tile must visit, split into full and partial.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _range_of(x, ok, axis: tl.constexpr):
    """Smallest and largest of ``x`` where ``ok`` along ``axis`` (none: lo > hi)."""
    lo = tl.min(tl.where(ok, x, _POS_HUGE), axis=axis)
    hi = tl.max(tl.where(ok, x, -_POS_HUGE), axis=axis)
    return lo, hi


@triton.jit
def _tile_lists_kernel(
    row_pos_ptr, n_row_tokens, row_limit, col_pos_ptr, n_col_tokens, col_limit, n_col_tiles,
    full_list_ptr, full_count_ptr, part_list_ptr, part_count_ptr, list_stride,
    window_left, window_right, chunk,
    row_doc_ptr, stride_rdb, stride_rds, col_doc_ptr, stride_cdb, stride_cds,
    key_ok_ptr, stride_kob, stride_kos, n_fact_rows,
    ROWS_ARE_QUERIES: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_CHUNK: tl.constexpr, FULL_ALLOWED: tl.constexpr, DOC_FACTS: tl.constexpr,
    KEY_FACTS: tl.constexpr,
):  # fmt: skip
    """Each row tile's lists of column tiles: full (every pair allowed) and partial (checked per
    element), from the tiles' position bounds and, with token facts, their ranges of document ids
    and of key validity (keys on the columns, or on the rows with ROWS_ARE_QUERIES off): a pair
    of tiles is full only if every batch row holds one and the same document on both sides and
    only valid keys, and is left out if no batch row holds a document on both sides and a valid
    key. One program per row tile; it reads the column tiles' tokens itself (one launch)."""
    row = tl.program_id(0)
    r_idx = row * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
    r_in = r_idx < n_row_tokens
    r_pos = tl.load(row_pos_ptr + r_idx, mask=r_in, other=0)
    r_valid = r_in & (r_pos < row_limit)
    r_lo, r_hi = _range_of(r_pos, r_valid, 0)
    r_full = tl.sum(r_valid.to(tl.int32), axis=0) == ROW_BLOCK
    n_full = tl.zeros([], tl.int32)
    n_part = tl.zeros([], tl.int32)
    for c0 in range(0, n_col_tiles, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        inside = cols < n_col_tiles
        c_idx = cols[:, None] * COL_BLOCK + tl.arange(0, COL_BLOCK)[None, :]  # (CHUNK, COL_BLOCK)
        c_in = c_idx < n_col_tokens
        c_pos = tl.load(col_pos_ptr + c_idx, mask=c_in, other=0)
        c_valid = c_in & (c_pos < col_limit)
        c_lo, c_hi = _range_of(c_pos, c_valid, 1)
        c_full = tl.sum(c_valid.to(tl.int32), axis=1) == COL_BLOCK
        # the row's scalars as vectors: combining a scalar and a vector boolean with & gives an
        # int32 vector in some Triton interpreters, which then refuse it as a mask
        zero = tl.zeros([CHUNK], tl.int64)
        if ROWS_ARE_QUERIES:
            q_lo = zero + r_lo
            q_hi = zero + r_hi
            k_lo = c_lo
            k_hi = c_hi
        else:
            q_lo = c_lo
            q_hi = c_hi
            k_lo = zero + r_lo
            k_hi = zero + r_hi
        # A tile pair is skipped when one rule fails for every pair (necessary, not sufficient,
        # for emptiness when rules combine: such pairs go to the masked path, which is exact).
        visible = inside & (k_lo <= k_hi) & (q_lo <= q_hi)
        full = (c_full.to(tl.int32) + (zero + r_full.to(tl.int64)).to(tl.int32)) == 2
        if CAUSAL:
            visible = visible & (k_lo <= q_hi)
            full = full & (k_hi <= q_lo)
        if HAS_WL:
            visible = visible & (k_hi >= q_lo - window_left)
            full = full & (k_lo >= q_hi - window_left)
        if HAS_WR:
            visible = visible & (k_lo <= q_hi + window_right)
            full = full & (k_hi <= q_lo + window_right)
        if HAS_CHUNK:  # (an empty tile is not visible whatever its bounds' chunks)
            visible = visible & (k_hi // chunk >= q_lo // chunk) & (k_lo // chunk <= q_hi // chunk)
            # each side in one chunk; visible makes it the same one
            full = full & (q_lo // chunk == q_hi // chunk) & (k_lo // chunk == k_hi // chunk)
        if DOC_FACTS or KEY_FACTS:
            any_row = cols < 0  # (all False) some batch row has a pair the facts allow
            every_row = cols >= 0  # (all True) every batch row allows every pair
            for f in range(n_fact_rows):
                row_ok = cols >= 0
                row_all = cols >= 0
                if DOC_FACTS:
                    d = tl.load(row_doc_ptr + f * stride_rdb + r_idx * stride_rds, mask=r_in, other=0)
                    d_lo, d_hi = _range_of(d.to(tl.int64), r_in, 0)
                    e = tl.load(col_doc_ptr + f * stride_cdb + c_idx * stride_cds, mask=c_in, other=0)
                    e_lo, e_hi = _range_of(e.to(tl.int64), c_in, 1)
                    d_lo = zero + d_lo
                    d_hi = zero + d_hi
                    row_ok = row_ok & (e_lo <= d_hi) & (d_lo <= e_hi)
                    row_all = row_all & (d_lo == d_hi) & (e_lo == e_hi) & (d_lo == e_lo)
                if KEY_FACTS:  # validity's range: hi 0 none valid, lo 1 all valid
                    if ROWS_ARE_QUERIES:
                        ok = tl.load(key_ok_ptr + f * stride_kob + c_idx * stride_kos, mask=c_in, other=0)
                        v_lo, v_hi = _range_of((ok != 0).to(tl.int64), c_in, 1)
                    else:
                        ok = tl.load(key_ok_ptr + f * stride_kob + r_idx * stride_kos, mask=r_in, other=0)
                        v_lo, v_hi = _range_of((ok != 0).to(tl.int64), r_in, 0)
                        v_lo = zero + v_lo
                        v_hi = zero + v_hi
                    row_ok = row_ok & (v_hi != 0)
                    row_all = row_all & (v_lo != 0)
                any_row = any_row | row_ok
                every_row = every_row & row_all
            visible = visible & any_row
            full = full & every_row
        if FULL_ALLOWED:
            full = full & visible
        else:
            full = tl.zeros(visible.shape, tl.int1)
        part = visible & (~full)
        full_i = full.to(tl.int32)
        part_i = part.to(tl.int32)
        base = row * list_stride
        tl.store(full_list_ptr + base + n_full + tl.cumsum(full_i, axis=0) - 1, cols, mask=full)
        tl.store(part_list_ptr + base + n_part + tl.cumsum(part_i, axis=0) - 1, cols, mask=part)
        n_full += tl.sum(full_i, axis=0)
        n_part += tl.sum(part_i, axis=0)
    tl.store(full_count_ptr + row, n_full)
    tl.store(part_count_ptr + row, n_part)


@dataclass
class _TileLists:
    full: torch.Tensor  # (n_rows, n_cols) int32, the first full_count[r] entries of row r used
    full_count: torch.Tensor  # (n_rows,) int32
    part: torch.Tensor
    part_count: torch.Tensor


class _TileListCache:
    """Tile lists of masks with a ``positions_key`` (the ring's: the same few each step of every
    call), kept up to a byte budget, least recently used out first: two small kernel launches
    and six allocations saved per attention call, which matter when the host is the bottleneck."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def key(mask: BlockMask, *how) -> tuple | None:
        if mask.positions_key is None or _TokenFacts.present(mask):
            return None  # (token facts are data: lists made from them are made each time)
        if mask.q_pos.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # a CUDA graph's private memory must not outlive it in a cache
        return (mask.positions_key, mask.seq_len, mask.rules, mask.q_pos.device, *how)

    def get(self, key) -> _TileLists | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key, lists: _TileLists) -> None:
        size = sum(t.numel() * t.element_size() for t in vars(lists).values())
        if size > self.budget:
            return
        self.entries[key] = (lists, size)
        self.nbytes += size
        while self.nbytes > self.budget:
            self.nbytes -= self.entries.popitem(last=False)[1][1]


_tile_list_cache = _TileListCache(256 << 20)


def _tile_lists(mask: BlockMask, rows_are_queries: bool, row_block: int, col_block: int,
                full_allowed: bool) -> _TileLists:  # fmt: skip
    key = _TileListCache.key(mask, rows_are_queries, row_block, col_block, full_allowed)
    lists = _tile_list_cache.get(key) if key is not None else None
    if lists is None:
        lists = _compute_tile_lists(mask, rows_are_queries, row_block, col_block, full_allowed)
        if key is not None:
            _tile_list_cache.put(key, lists)
    return lists


def _compute_tile_lists(mask: BlockMask, rows_are_queries: bool, row_block: int, col_block: int,
                        full_allowed: bool) -> _TileLists:  # fmt: skip
    q_pos, k_pos, rules = mask.q_pos, mask.k_pos, mask.rules
    # Queries at padding positions still get outputs (the reference computes them), so every
    # query is valid; keys at positions >= seq_len are never visible.
    q_limit, k_limit = _POS_HUGE.value, mask.seq_len
    if rows_are_queries:
        row_pos, row_limit, col_pos, col_limit = q_pos, q_limit, k_pos, k_limit
    else:
        row_pos, row_limit, col_pos, col_limit = k_pos, k_limit, q_pos, q_limit
    n_rows = triton.cdiv(row_pos.numel(), row_block)
    n_cols = triton.cdiv(col_pos.numel(), col_block)
    dev = row_pos.device
    full = torch.empty((n_rows, n_cols), dtype=torch.int32, device=dev)
    part = torch.empty_like(full)
    full_count = torch.empty(n_rows, dtype=torch.int32, device=dev)
    part_count = torch.empty_like(full_count)
    facts = _TokenFacts.of(mask, rows_are_queries)
    _tile_lists_kernel[(n_rows,)](
        row_pos, row_pos.numel(), row_limit, col_pos, col_pos.numel(), col_limit, n_cols,
        full, full_count, part, part_count, n_cols,
        rules.window_left, rules.window_right, max(rules.chunk, 1),
        *facts.kernel_args(),
        ROWS_ARE_QUERIES=rows_are_queries, ROW_BLOCK=row_block, COL_BLOCK=col_block,
        # (CHUNK x COL_BLOCK tokens per loop iteration)
        CHUNK=max(1, min(64, 4096 // col_block)),
        CAUSAL=rules.causal, HAS_WL=rules.window_left >= 0, HAS_WR=rules.window_right >= 0,
        HAS_CHUNK=rules.chunk > 0,
        FULL_ALLOWED=full_allowed, DOC_FACTS=facts.has_docs, KEY_FACTS=facts.has_key_ok,
    )  # fmt: skip
    return _TileLists(full, full_count, part, part_count)


@dataclass
class _TokenFacts:
    """The token facts the tile lists read: document ids of the row and column tokens and the
    keys' validity, each (batch, tokens) with its strides (placeholders where absent: their
    flags are off)."""

    row_doc: torch.Tensor
    col_doc: torch.Tensor
    key_ok: torch.Tensor
    batch_rows: int
    has_docs: bool
    has_key_ok: bool

    @staticmethod
    def present(mask: BlockMask) -> bool:
        return mask.q_doc is not None or mask.k_valid is not None

    @classmethod
    def of(cls, mask: BlockMask, rows_are_queries: bool) -> _TokenFacts:
        placeholder = mask.q_pos[None]
        if not cls.present(mask):
            return cls(placeholder, placeholder, placeholder, 0, False, False)
        batch = max(t.shape[0] for t in (mask.q_doc, mask.k_doc, mask.k_valid) if t is not None)
        row_doc = col_doc = key_ok = placeholder
        if mask.q_doc is not None:
            q_doc, k_doc = mask.q_doc.expand(batch, -1), mask.k_doc.expand(batch, -1)
            row_doc, col_doc = (q_doc, k_doc) if rows_are_queries else (k_doc, q_doc)
        if mask.k_valid is not None:
            key_ok = mask.k_valid.expand(batch, -1)
            if key_ok.dtype == torch.bool:
                key_ok = key_ok.view(torch.uint8)
        return cls(row_doc, col_doc, key_ok, batch, mask.q_doc is not None,
                   mask.k_valid is not None)

    def kernel_args(self) -> tuple:
        return (self.row_doc, *self.row_doc.stride(), self.col_doc, *self.col_doc.stride(),
                self.key_ok, *self.key_ok.stride(), self.batch_rows)


# ---------------------------------------------------------------------------------------------
# Per-element mask facts
# ---------------------------------------------------------------------------------------------


@dataclass
class _MaskArgs:
    """A BlockMask as kernel arguments: tensors (or a dummy) with broadcast strides, and flags."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    seq_len: int
    window_left: int
    window_right: int
    chunk: int
    q_doc: torch.Tensor
    k_doc: torch.Tensor
    doc_strides: tuple[int, int, int, int]  # q_doc (b, s), k_doc (b, s)
    k_valid: torch.Tensor
    k_valid_strides: tuple[int, int]
    dense: torch.Tensor
    dense_strides: tuple[int, int, int, int]
    offset: torch.Tensor  # an additive dense's row offsets (BlockMask.dense_offset)
    offset_strides: tuple[int, int, int]
    causal: bool
    has_wl: bool
    has_wr: bool
    has_chunk: bool
    has_docs: bool
    has_kvalid: bool
    dense_kind: int  # 0 none, 1 boolean keep-mask, 2 additive

    def kernel_args(self) -> tuple:
        return (
            self.q_pos, self.k_pos, self.seq_len, self.window_left, self.window_right, self.chunk,
            self.q_doc, self.k_doc, *self.doc_strides,
            self.k_valid, *self.k_valid_strides,
            self.dense, *self.dense_strides,
            self.offset, *self.offset_strides,
        )  # fmt: skip

    def kernel_flags(self) -> dict:
        return dict(
            CAUSAL=self.causal, HAS_WL=self.has_wl, HAS_WR=self.has_wr, HAS_CHUNK=self.has_chunk,
            HAS_DOCS=self.has_docs, HAS_KVALID=self.has_kvalid, DENSE_KIND=self.dense_kind,
            DENSE_PER_KEY=self.dense_kind != 0 and self.dense_strides[2] == 0,
        )  # fmt: skip


def _mask_args(mask: BlockMask, B: int, H: int, Sq: int, Sk: int, dev) -> _MaskArgs:
    dummy = mask.q_pos  # stands in for absent tensors; never read (its flag is off)
    q_doc = k_doc = k_valid = dense = dummy
    doc_strides = (0, 0, 0, 0)
    k_valid_strides = (0, 0)
    dense_strides = (0, 0, 0, 0)
    offset, offset_strides = dummy, (0, 0, 0)
    has_docs = mask.q_doc is not None
    if has_docs:
        q_doc = mask.q_doc.expand(B, Sq)
        k_doc = mask.k_doc.expand(B, Sk)
        doc_strides = (*q_doc.stride(), *k_doc.stride())
    has_kvalid = mask.k_valid is not None
    if has_kvalid:
        k_valid = mask.k_valid
        if k_valid.dtype == torch.bool:
            k_valid = k_valid.view(torch.uint8)
        k_valid = k_valid.expand(B, Sk)
        k_valid_strides = k_valid.stride()
    dense_kind = 0
    if mask.dense is not None:
        dense = mask.dense
        if dense.dtype == torch.bool:
            dense_kind = 1
            dense = dense.view(torch.uint8)
        else:
            dense_kind = 2
            offset = mask.dense_offset
            if offset is None:
                offset = dense.new_zeros((1, 1, Sq), dtype=torch.float32)
            offset = offset.to(torch.float32).expand(B, H, Sq)
            offset_strides = offset.stride()
        dense = dense.expand(B, H, Sq, Sk)
        dense_strides = dense.stride()
    # Inside tiles, positions are int32; bounds beyond int32 mean "unbounded" there.
    seq_len = min(mask.seq_len, _INT32_MAX)
    rules = mask.rules
    return _MaskArgs(
        q_pos=mask.q_pos, k_pos=mask.k_pos, seq_len=seq_len,
        window_left=min(rules.window_left, _INT32_MAX),
        window_right=min(rules.window_right, _INT32_MAX), chunk=max(min(rules.chunk, _INT32_MAX), 1),
        q_doc=q_doc, k_doc=k_doc, doc_strides=doc_strides,
        k_valid=k_valid, k_valid_strides=k_valid_strides,
        dense=dense, dense_strides=dense_strides, offset=offset, offset_strides=offset_strides,
        causal=rules.causal, has_wl=rules.window_left >= 0, has_wr=rules.window_right >= 0,
        has_chunk=rules.chunk > 0, has_docs=has_docs, has_kvalid=has_kvalid, dense_kind=dense_kind,
    )  # fmt: skip


@triton.jit
def _token_rules(q_pos, k_pos, seq_len, window_left, window_right, chunk, q_doc, k_doc, k_valid,
                 QUERIES_ON_ROWS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
                 HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_DOCS: tl.constexpr,
                 HAS_KVALID: tl.constexpr):  # fmt: skip
    """The rules of ``ringcompile.masks`` (``BlockMask.allowed``) as a boolean tile: queries on
    its rows (or its columns), keys on the other dim. Positions are int32 vectors; the documents
    and key validity vectors are None where their flag is off."""
    if QUERIES_ON_ROWS:
        qp = q_pos[:, None]
        kp = k_pos[None, :]
    else:
        qp = q_pos[None, :]
        kp = k_pos[:, None]
    ok = kp < seq_len
    # differences of int32 positions below 2**31 cannot overflow
    dist = qp - kp
    if CAUSAL:
        ok = ok & (dist >= 0)
    if HAS_WL:
        ok = ok & (dist <= window_left)
    if HAS_WR:
        ok = ok & (-dist <= window_right)
    if HAS_CHUNK:  # positions are >= 0: // floors
        ok = ok & (qp // chunk == kp // chunk)
    if HAS_DOCS:
        if QUERIES_ON_ROWS:
            ok = ok & (q_doc[:, None] == k_doc[None, :])
        else:
            ok = ok & (q_doc[None, :] == k_doc[:, None])
    if HAS_KVALID:
        if QUERIES_ON_ROWS:
            ok = ok & (k_valid[None, :] != 0)
        else:
            ok = ok & (k_valid[:, None] != 0)
    return ok


@triton.jit
def _masked_softmax_step(m_i, l_i, acc, s, v):
    """One online-softmax step over a tile of scores ``s`` (log2 units, -inf where hidden) and
    its values: the running max, sum and unnormalised output after it."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows that have seen no key yet keep max -inf; subtract 0 there instead to avoid NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
def _add_mask(s, mask, offset):
    """Scores (log2 units) plus an additive mask, less the row's offset: added in natural units,
    as SDPA adds it, so a row the mask fills with finfo.min rounds every score to that value
    and, less the offset (that value), to 0: one weight per key, as SDPA gives it."""
    natural = s * _LN2_K + mask.to(tl.float32)
    return (natural - offset) * _LOG2E_K


@triton.jit
def _dense_tile(base, q_offs, k_offs, q_ok, k_ok, stride_mq, stride_mk,
                PER_KEY: tl.constexpr, KEYS_FIRST: tl.constexpr):  # fmt: skip
    """A dense mask's tile at ``base`` (its batch and head): (queries, keys), or (keys, queries)
    with KEYS_FIRST. A mask alike for every query (stride 0 over them: a key bias such as ALiBi's)
    loads one vector of keys, not a tile of repeats. Out-of-range elements read 0."""
    # (one return: triton compiles the statements after an early return in a constexpr branch)
    if PER_KEY:
        keys = tl.load(base + k_offs * stride_mk, mask=k_ok, other=0)
        if KEYS_FIRST:
            tile = keys[:, None]
        else:
            tile = keys[None, :]
    else:
        q_offs = q_offs.to(tl.int64)  # an S x S mask passes 2**31 elements beyond 46k tokens
        if KEYS_FIRST:
            tile = tl.load(base + q_offs[None, :] * stride_mq + k_offs[:, None] * stride_mk,
                           mask=k_ok[:, None] & q_ok[None, :], other=0)
        else:
            tile = tl.load(base + q_offs[:, None] * stride_mq + k_offs[None, :] * stride_mk,
                           mask=q_ok[:, None] & k_ok[None, :], other=0)
    return tile


@triton.jit
def _doc_range(doc, ok):
    """Smallest and largest document id among a tile's tokens where ``ok`` (none: lo > hi). Two
    tiles whose ranges do not meet hold no (query, key) pair of one document, whatever the ids'
    order: the tile lists skip such tiles in every batch row; this skips them per batch row."""
    lo = tl.min(tl.where(ok, doc, _POS_HUGE), axis=0)
    hi = tl.max(tl.where(ok, doc, -_POS_HUGE), axis=0)
    return lo, hi


@triton.jit
def _tile_and_head(n_tiles, heads_per_chunk, LAST_HEAVIEST: tl.constexpr):
    """This program's (tile, batch*head) in a flat grid: chunk after chunk of ``heads_per_chunk``
    heads, and inside a chunk tile after tile, heaviest first, heads fastest.

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
    return i, first + r % width


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


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, STATE_OUT, STATE_LSE, FINAL_OUT,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_fb, stride_fh, stride_fs,
    full_list, full_count, part_list, part_count, list_stride,
    q_pos_ptr, k_pos_ptr, seq_len, window_left, window_right, chunk,
    q_doc_ptr, k_doc_ptr, stride_qdb, stride_qds, stride_kdb, stride_kds,
    k_valid_ptr, stride_kvb, stride_kvs,
    dense_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    off_ptr, stride_xb, stride_xh, stride_xs,
    Sq, Sk, H, GROUP, qk_scale, heads_per_chunk,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_KVALID: tl.constexpr, DENSE_KIND: tl.constexpr, DENSE_PER_KEY: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    # under causal masks later query tiles see more keys
    tile, bh = _tile_and_head(tl.cdiv(Sq, BLOCK_M), heads_per_chunk, LAST_HEAVIEST=True)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs = q_ptrs + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_d[None, :]
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + offs_d[None, :]

    state_row = bh.to(tl.int64) * Sq + offs_m  # state tensors are contiguous (B, H, Sq[, D])
    if FIRST:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    else:
        # Resume from the normalised state: max = lse, sum = 1, accumulator = out (exact).
        m_i = tl.load(STATE_LSE + state_row, mask=row_ok, other=float("-inf")) * _LOG2E_K
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        # The state streams through once per step: evict it first, so that it does not push
        # the K/V tiles that other programs are reading out of L2 (2-4 % per step at 8k).
        acc = tl.load(STATE_OUT + state_row[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                      eviction_policy="evict_first")  # fmt: skip

    # Full tiles: every pair visible and the whole key tile inside the block.
    n_full = tl.load(full_count + tile)
    for i in range(n_full):
        n0 = tl.load(full_list + tile * list_stride + i) * BLOCK_N
        kv_rows = (n0 + offs_n)[:, None]
        if HEAD_DIM == D_PAD:
            k = tl.load(k_base + kv_rows * stride_ks)
            v = tl.load(v_base + kv_rows * stride_vs)
        else:
            k = tl.load(k_base + kv_rows * stride_ks, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + kv_rows * stride_vs, mask=d_ok[None, :], other=0.0)
        # max before scaling (qk_scale > 0): scaling and subtracting the max become one FMA
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Partial tiles: evaluate every rule per element.
    q_pos = tl.load(q_pos_ptr + offs_m, mask=row_ok, other=0).to(tl.int32)
    if DENSE_KIND == 2:
        row_off = tl.load(off_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
                          + offs_m * stride_xs, mask=row_ok, other=0.0)  # fmt: skip
    q_doc = None
    if HAS_DOCS:
        q_doc = tl.load(q_doc_ptr + b * stride_qdb + offs_m * stride_qds, mask=row_ok, other=0)
        q_doc_lo, q_doc_hi = _doc_range(q_doc, row_ok)
    n_part = tl.load(part_count + tile)
    for i in range(n_part):
        n0 = tl.load(part_list + tile * list_stride + i) * BLOCK_N
        offs_k = n0 + offs_n
        k_ok = offs_k < Sk
        kv_rows = offs_k[:, None]
        visit = True
        k_doc = None
        k_valid = None
        if HAS_DOCS:
            k_doc = tl.load(k_doc_ptr + b * stride_kdb + offs_k * stride_kds, mask=k_ok, other=0)
            k_doc_lo, k_doc_hi = _doc_range(k_doc, k_ok)
            visit = (k_doc_lo <= q_doc_hi) & (q_doc_lo <= k_doc_hi)
        # (a constant True without documents: the compiler drops the branch)
        if visit:
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + kv_rows * stride_ks, mask=kv_mask, other=0.0)
            v = tl.load(v_base + kv_rows * stride_vs, mask=kv_mask, other=0.0)
            k_pos = tl.load(k_pos_ptr + offs_k, mask=k_ok, other=0).to(tl.int32)
            if HAS_KVALID:
                k_valid = tl.load(k_valid_ptr + b * stride_kvb + offs_k * stride_kvs, mask=k_ok, other=0)
            keep = _token_rules(q_pos, k_pos, seq_len, window_left, window_right, chunk, q_doc,
                                k_doc, k_valid, True, CAUSAL, HAS_WL, HAS_WR, HAS_CHUNK,
                                HAS_DOCS, HAS_KVALID) & k_ok[None, :]  # fmt: skip
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if DENSE_KIND != 0:
                dense = _dense_tile(
                    dense_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh,
                    offs_m, offs_k, row_ok, k_ok, stride_mq, stride_mk, DENSE_PER_KEY, False)
                if DENSE_KIND == 1:
                    keep = keep & (dense != 0)
                else:
                    s = _add_mask(s, dense, row_off[:, None])
            m_i, l_i, acc = _masked_softmax_step(m_i, l_i, acc, tl.where(keep, s, float("-inf")), v)

    out, lse = _softmax_result(m_i, l_i, acc)
    tl.store(STATE_LSE + state_row, lse, mask=row_ok)
    if LAST:
        f_ptrs = FINAL_OUT + b.to(tl.int64) * stride_fb + h.to(tl.int64) * stride_fh
        f_ptrs = f_ptrs + offs_m[:, None] * stride_fs + offs_d[None, :]
        tl.store(f_ptrs, out.to(FINAL_OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(STATE_OUT + state_row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :], cache_modifier=".cs")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
                  S, H, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    do_ptrs = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    o = tl.load(o_ptrs + rows[:, None] * stride_os + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptrs + rows[:, None] * stride_ds + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _bwd_block(
    k, v, dk, dv, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dq_ptrs, dq_desc, dq_at, row_ok, d_ok,
    keep, qk_scale, sm_scale, dense_bias, row_off,
    CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, DENSE_ADD: tl.constexpr,
    DQ_MODE: tl.constexpr, EARLY_DP: tl.constexpr,
):  # fmt: skip
    """One (key tile, query tile) pair of the backward, transposed: rows are keys.

    DQ_MODE: 0 = dq comes from _bwd_dq_kernel; 1 = added here by fp32 atomics; 2 = added here by
    one bulk reduction of the tile through the tensor-copy engine (``dq_desc`` at ``dq_at``).
    """
    if CHECK_ROWS:
        io_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=io_mask, other=0.0)
        do = tl.load(do_ptrs, mask=io_mask, other=0.0)
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    elif EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    else:
        q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    # Rows that saw no key (lse = -inf) get probability 0 everywhere, hence zero gradients.
    m2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)
    s_t = tl.dot(k, tl.trans(q)) * qk_scale
    if DENSE_ADD:
        s_t = _add_mask(s_t, dense_bias, row_off[None, :])
    if MASKED:
        s_t = tl.where(keep, s_t, float("-inf"))
    if EARLY_DP:
        # dp_t's dot (which waits for every dot in flight) before dv's: dv's dot then runs while
        # ds_t is formed. At head dim 256 holding dp_t that long costs more in spills.
        dp_t = tl.dot(v, tl.trans(do))
        p_t = tl.exp2(s_t - m2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
    else:
        p_t = tl.exp2(s_t - m2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q)
    if DQ_MODE != 0:
        dq = tl.dot(tl.trans(ds_t), k) * sm_scale
    if DQ_MODE == 2:
        dq_desc.atomic_add(dq_at, tl.reshape(dq, [1, 1, dq.shape[0], dq.shape[1]]))
    elif DQ_MODE == 1:
        if EVEN_D and not CHECK_ROWS:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQ_DESC, DK, DV,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    full_list, full_count, part_list, part_count, list_stride,
    q_pos_ptr, k_pos_ptr, seq_len, window_left, window_right, chunk,
    q_doc_ptr, k_doc_ptr, stride_qdb, stride_qds, stride_kdb, stride_kds,
    k_valid_ptr, stride_kvb, stride_kvs,
    dense_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    off_ptr, stride_xb, stride_xh, stride_xs,
    Sq, Sk, HKV, GROUP, qk_scale, sm_scale, heads_per_chunk,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_KVALID: tl.constexpr, DENSE_KIND: tl.constexpr, DENSE_PER_KEY: tl.constexpr,
    DQ_MODE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):  # fmt: skip
    # under causal masks earlier key tiles are seen by more queries
    tile, bhk = _tile_and_head(tl.cdiv(Sk, BLOCK_N), heads_per_chunk, LAST_HEAVIEST=False)
    b = bhk // HKV
    hk = bhk % HKV
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    n_full = tl.load(full_count + tile)
    n_part = tl.load(part_count + tile)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k_ok = offs_n < Sk
    d_ok = offs_d < HEAD_DIM
    kv_mask = k_ok[:, None] & d_ok[None, :]
    b64 = b.to(tl.int64)
    dk_base = DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh
    if n_full + n_part > 0:
        offs_m = tl.arange(0, BLOCK_M)
        k = tl.load(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_ks
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # fmt: skip
        v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vs
                    + offs_d[None, :], mask=kv_mask, other=0.0)  # fmt: skip
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

        # Full query tiles of every query head of this KV head's group, as one flat loop so that
        # the compiler pipelines across heads too.
        for it in range(GROUP * n_full):
            h = hk * GROUP + it // n_full
            m0 = tl.load(full_list + tile * list_stride + it % n_full) * BLOCK_M
            rows = m0 + offs_m
            bh = b64 * HKV * GROUP + h
            dk, dv = _bwd_block(
                k, v, dk, dv,
                Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                LSE + bh * Sq + rows, DELTA + bh * Sq + rows,
                DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
                DQ_DESC, [b, h, m0, 0], rows < Sq, d_ok, None, qk_scale, sm_scale, None, None,
                CHECK_ROWS=False, EVEN_D=EVEN_D, MASKED=False, DENSE_ADD=False,
                DQ_MODE=DQ_MODE, EARLY_DP=D_PAD <= 128,
            )  # fmt: skip

        k_pos = tl.load(k_pos_ptr + offs_n, mask=k_ok, other=0).to(tl.int32)
        k_doc = None
        k_valid = None
        if HAS_DOCS:
            k_doc = tl.load(k_doc_ptr + b * stride_kdb + offs_n * stride_kds, mask=k_ok, other=0)
            k_doc_lo, k_doc_hi = _doc_range(k_doc, k_ok)
        if HAS_KVALID:
            k_valid = tl.load(k_valid_ptr + b * stride_kvb + offs_n * stride_kvs, mask=k_ok, other=0)
        for it in range(GROUP * n_part):
            h = hk * GROUP + it // n_part
            m0 = tl.load(part_list + tile * list_stride + it % n_part) * BLOCK_M
            rows = m0 + offs_m
            row_ok = rows < Sq
            visit = True
            q_doc = None
            if HAS_DOCS:
                q_doc = tl.load(q_doc_ptr + b * stride_qdb + rows * stride_qds, mask=row_ok, other=0)
                q_doc_lo, q_doc_hi = _doc_range(q_doc, row_ok)
                visit = (k_doc_lo <= q_doc_hi) & (q_doc_lo <= k_doc_hi)
            # (a constant True without documents: the compiler drops the branch)
            if visit:
                bh = b64 * HKV * GROUP + h
                q_pos = tl.load(q_pos_ptr + rows, mask=row_ok, other=0).to(tl.int32)
                keep = _token_rules(q_pos, k_pos, seq_len, window_left, window_right, chunk,
                                    q_doc, k_doc, k_valid, False, CAUSAL, HAS_WL, HAS_WR,
                                    HAS_CHUNK, HAS_DOCS, HAS_KVALID) & k_ok[:, None]  # fmt: skip
                dense_bias = None
                row_off = None
                if DENSE_KIND != 0:
                    dense = _dense_tile(dense_ptr + b64 * stride_mb + h.to(tl.int64) * stride_mh,
                                        rows, offs_n, row_ok, k_ok, stride_mq, stride_mk,
                                        DENSE_PER_KEY, True)  # fmt: skip
                    if DENSE_KIND == 1:
                        keep = keep & (dense != 0)
                    else:
                        dense_bias = dense
                        row_off = tl.load(off_ptr + b64 * stride_xb + h.to(tl.int64) * stride_xh
                                          + rows * stride_xs, mask=row_ok, other=0.0)  # fmt: skip
                dk, dv = _bwd_block(
                    k, v, dk, dv,
                    Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                    DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                    LSE + bh * Sq + rows, DELTA + bh * Sq + rows,
                    DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
                    DQ_DESC, [b, h, m0, 0], row_ok, d_ok, keep, qk_scale, sm_scale, dense_bias, row_off,
                    CHECK_ROWS=True, EVEN_D=EVEN_D, MASKED=True, DENSE_ADD=DENSE_KIND == 2,
                    DQ_MODE=DQ_MODE, EARLY_DP=D_PAD <= 128,
                )  # fmt: skip

        _write_dkv(dk_base, offs_n, offs_d, stride_dks, kv_mask, dk * sm_scale, ACCUMULATE)
        _write_dkv(dv_base, offs_n, offs_d, stride_dvs, kv_mask, dv, ACCUMULATE)
    elif not ACCUMULATE:
        # no query sees these keys; an overwritten accumulator still needs its zeros
        zeros = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        _write_dkv(dk_base, offs_n, offs_d, stride_dks, kv_mask, zeros, False)
        _write_dkv(dv_base, offs_n, offs_d, stride_dvs, kv_mask, zeros, False)


@triton.jit
def _write_dkv(base, offs_n, offs_d, stride_s, mask, value, ACCUMULATE: tl.constexpr):
    """Write one program's dK or dV tile (it alone owns these rows), or add it to what is there.
    Streamed once per step, like the forward's state: loaded evict-first, stored streaming, so
    the reused Q/dO tiles keep L2. The tile's pointers are made here, after the loops: made
    before, they would hold registers through them."""
    ptrs = base + offs_n[:, None] * stride_s + offs_d[None, :]
    if ACCUMULATE:
        value = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first") + value
    tl.store(ptrs, value, mask=mask, cache_modifier=".cs")


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    full_list, full_count, part_list, part_count, list_stride,
    q_pos_ptr, k_pos_ptr, seq_len, window_left, window_right, chunk,
    q_doc_ptr, k_doc_ptr, stride_qdb, stride_qds, stride_kdb, stride_kds,
    k_valid_ptr, stride_kvb, stride_kvs,
    dense_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    off_ptr, stride_xb, stride_xh, stride_xs,
    Sq, Sk, H, GROUP, qk_scale, sm_scale, heads_per_chunk,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    HAS_KVALID: tl.constexpr, DENSE_KIND: tl.constexpr, DENSE_PER_KEY: tl.constexpr,
):  # fmt: skip
    """dq of one query tile over the key tiles of its lists (the forward's loop, recomputed)."""
    tile, bh = _tile_and_head(tl.cdiv(Sq, BLOCK_M), heads_per_chunk, LAST_HEAVIEST=True)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    n_full = tl.load(full_count + tile)
    n_part = tl.load(part_count + tile)
    if n_full + n_part > 0:
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        row_ok = offs_m < Sq
        d_ok = offs_d < HEAD_DIM
        io_mask = row_ok[:, None] & d_ok[None, :]
        b64 = b.to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs
                    + offs_d[None, :], mask=io_mask, other=0.0)  # fmt: skip
        do = tl.load(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dos
                     + offs_d[None, :], mask=io_mask, other=0.0)  # fmt: skip
        lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=row_ok, other=float("inf"))
        m2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)
        delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=row_ok, other=0.0)
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_d[None, :]
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_d[None, :]
        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for i in range(n_full):
            n0 = tl.load(full_list + tile * list_stride + i) * BLOCK_N
            kv_rows = (n0 + offs_n)[:, None]
            if HEAD_DIM == D_PAD:
                k = tl.load(k_base + kv_rows * stride_ks)
                v = tl.load(v_base + kv_rows * stride_vs)
            else:
                k = tl.load(k_base + kv_rows * stride_ks, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_base + kv_rows * stride_vs, mask=d_ok[None, :], other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - m2[:, None])
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += tl.dot(ds, k)

        q_pos = tl.load(q_pos_ptr + offs_m, mask=row_ok, other=0).to(tl.int32)
        q_doc = None
        if HAS_DOCS:
            q_doc = tl.load(q_doc_ptr + b * stride_qdb + offs_m * stride_qds, mask=row_ok, other=0)
            q_doc_lo, q_doc_hi = _doc_range(q_doc, row_ok)
        if DENSE_KIND == 2:
            row_off = tl.load(off_ptr + b64 * stride_xb + h.to(tl.int64) * stride_xh
                              + offs_m * stride_xs, mask=row_ok, other=0.0)  # fmt: skip
        for i in range(n_part):
            n0 = tl.load(part_list + tile * list_stride + i) * BLOCK_N
            offs_k = n0 + offs_n
            k_ok = offs_k < Sk
            visit = True
            k_doc = None
            k_valid = None
            if HAS_DOCS:
                k_doc = tl.load(k_doc_ptr + b * stride_kdb + offs_k * stride_kds, mask=k_ok, other=0)
                k_doc_lo, k_doc_hi = _doc_range(k_doc, k_ok)
                visit = (k_doc_lo <= q_doc_hi) & (q_doc_lo <= k_doc_hi)
            # (a constant True without documents: the compiler drops the branch)
            if visit:
                kv_mask = k_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + offs_k[:, None] * stride_ks, mask=kv_mask, other=0.0)
                v = tl.load(v_base + offs_k[:, None] * stride_vs, mask=kv_mask, other=0.0)
                k_pos = tl.load(k_pos_ptr + offs_k, mask=k_ok, other=0).to(tl.int32)
                if HAS_KVALID:
                    k_valid = tl.load(k_valid_ptr + b * stride_kvb + offs_k * stride_kvs, mask=k_ok, other=0)
                keep = _token_rules(q_pos, k_pos, seq_len, window_left, window_right, chunk,
                                    q_doc, k_doc, k_valid, True, CAUSAL, HAS_WL, HAS_WR,
                                    HAS_CHUNK, HAS_DOCS, HAS_KVALID) & k_ok[None, :]  # fmt: skip
                s = tl.dot(q, tl.trans(k)) * qk_scale
                if DENSE_KIND != 0:
                    dense = _dense_tile(dense_ptr + b64 * stride_mb + h.to(tl.int64) * stride_mh,
                                        offs_m, offs_k, row_ok, k_ok, stride_mq, stride_mk,
                                        DENSE_PER_KEY, False)  # fmt: skip
                    if DENSE_KIND == 1:
                        keep = keep & (dense != 0)
                    else:
                        s = _add_mask(s, dense, row_off[:, None])
                p = tl.exp2(tl.where(keep, s, float("-inf")) - m2[:, None])
                dp = tl.dot(do, tl.trans(v))
                ds = (p * (dp - delta[:, None])).to(k.dtype)
                dq += tl.dot(ds, k)

        # One program per (query tile, head): plain read-add-write.
        dq_ptrs = DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh
        dq_ptrs = dq_ptrs + offs_m[:, None] * stride_dqs + offs_d[None, :]
        tl.store(dq_ptrs, tl.load(dq_ptrs, mask=io_mask, other=0.0) + dq * sm_scale, mask=io_mask)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fill completely comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _head_dim_padded(d: int) -> int:
    if d > 256:
        raise ValueError(f"TritonKernels supports head dims up to 256, got {d}")
    return max(16, triton.next_power_of_2(d))


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_offsets(*tensors: torch.Tensor) -> None:
    # Offsets inside one (batch, head) slice are int32 in the kernels.
    for t in tensors:
        if t.shape[-2] * t.stride(-2) >= 2**31:
            raise ValueError(f"a head slice of a tensor of shape {tuple(t.shape)} is too large")


class _on_device:
    """Make ``t``'s device current for the launches (a no-op on CPU, under the interpreter)."""

    def __init__(self, t: torch.Tensor):
        self.guard = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)


class TritonKernels:
    """Triton implementation of :class:`ringcompile.kernels.AttentionKernels`.

    ``fwd_config`` / ``bwd_config`` override the tuned tile shapes (benchmarks and tests use
    them); ``None`` picks them from the head dim and dtype.
    """

    def __init__(self, fwd_config: FwdConfig | None = None, bwd_config: BwdConfig | None = None):
        self.fwd_config = fwd_config
        self.bwd_config = bwd_config

    # -- forward ---------------------------------------------------------------------------
    def forward_init(self, q: torch.Tensor) -> ForwardState:
        B, H, Sq, _ = q.shape
        lse = _empty((B, H, Sq), torch.float32, q.device)
        return ForwardState(q_shape=q.shape, lse=lse)

    def forward_step(self, state: ForwardState, q, k, v, mask: BlockMask, scale: float,
                     last: bool) -> None:  # fmt: skip
        if state.final_out is not None:
            raise RuntimeError("forward_step after the last step")
        B, H, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
        if scale < 0:
            # the kernel needs a positive scale; (-q)·k * |scale| is the same score
            q, scale = -q, -scale
        _check_offsets(q, k, v)
        d_pad = _head_dim_padded(D)
        first = state.steps == 0
        cfg = self.fwd_config or _default_fwd_config(d_pad, q.dtype, Sq, Sk, last)
        if last:
            state.final_out = _empty((B, H, Sq, D), q.dtype, q.device)
            final_out = state.final_out
        else:
            if state.out is None:
                state.out = _empty((B, H, Sq, D), torch.float32, q.device)
            final_out = state.out  # not written (LAST is off); any tensor fills the argument
        # the previous state is only read when there is one
        state_out = state.out if state.out is not None else final_out
        with _on_device(q):
            margs = _mask_args(mask, B, H, Sq, Sk, q.device)
            lists = _tile_lists(mask, True, cfg.block_m, cfg.block_n, margs.dense_kind == 0)
            n_tiles = triton.cdiv(Sq, cfg.block_m)
            chunk = _heads_per_chunk(cfg, n_tiles, B * H, H // Hkv, q.device)
            _fwd_kernel[(n_tiles * B * H,)](
                q, k, v, state_out, state.lse, final_out,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                final_out.stride(0), final_out.stride(1), final_out.stride(2),
                lists.full, lists.full_count, lists.part, lists.part_count, lists.full.shape[1],
                *margs.kernel_args(),
                Sq, Sk, H, H // Hkv, scale * _LOG2E, chunk,
                HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                FIRST=first, LAST=last, **margs.kernel_flags(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        state.steps += 1

    def forward_finish(self, state: ForwardState, dtype: torch.dtype):
        return finish_forward(state, dtype)

    # -- backward --------------------------------------------------------------------------
    def backward_prepare(self, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        B, H, S, D = out.shape
        out, dout = _inner_contiguous(out), _inner_contiguous(dout)
        delta = _empty((B, H, S), torch.float32, out.device)
        block = 64
        with _on_device(out):
            _delta_kernel[(triton.cdiv(S, block), B * H)](
                out, dout, delta,
                out.stride(0), out.stride(1), out.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                S, H, HEAD_DIM=D, D_PAD=_head_dim_padded(D), BLOCK=block,
            )  # fmt: skip
        return delta

    def backward_step(self, q, k, v, dout, lse, delta, mask: BlockMask, scale: float,
                      dq, dk, dv, dkv_fresh: bool = False) -> None:  # fmt: skip
        B, H, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        q, k, v, dout = (_inner_contiguous(t) for t in (q, k, v, dout))
        dq, dk, dv, dkv_fresh = accumulators(dq, dk, dv, dkv_fresh)
        for acc in (dq, dk, dv):
            if acc.stride(-1) != 1 or acc.dtype != torch.float32:
                raise ValueError("gradient accumulators must be fp32 with a contiguous last dim")
        _check_offsets(q, k, v, dout, dq, dk, dv)
        lse, delta = lse.contiguous(), delta.contiguous()
        d_pad = _head_dim_padded(D)
        bulk_ok = _bulk_reduce_ok(dq)
        r = mask.rules
        banded = r.causal or r.window is not None or r.chunk > 0
        cfg = self.bwd_config or _default_bwd_config(d_pad, q.dtype, banded, bulk_ok)
        dq_mode, dq_desc = 0, None
        if cfg.dq is None:
            dq_mode = 1
            if cfg.dq_bulk and bulk_ok:
                dq_mode = 2
                dq_desc = TensorDescriptor(dq, list(dq.shape), list(dq.stride()),
                                           [1, 1, cfg.block_m, d_pad])  # fmt: skip
        with _on_device(q):
            margs = _mask_args(mask, B, H, Sq, Sk, q.device)
            lists = _tile_lists(mask, False, cfg.block_n, cfg.block_m, margs.dense_kind == 0)
            n_tiles = triton.cdiv(Sk, cfg.block_n)
            chunk = _kv_heads_per_chunk(cfg, n_tiles, B * Hkv, q.device)
            _bwd_kernel[(n_tiles * B * Hkv,)](
                q, k, v, dout, lse, delta, dq, dq_desc, dk, dv,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                dout.stride(0), dout.stride(1), dout.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2),
                lists.full, lists.full_count, lists.part, lists.part_count, lists.full.shape[1],
                *margs.kernel_args(),
                Sq, Sk, Hkv, H // Hkv, scale * _LOG2E, scale, chunk,
                HEAD_DIM=D, D_PAD=d_pad, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
                DQ_MODE=dq_mode, ACCUMULATE=not dkv_fresh, **margs.kernel_flags(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            if dq_mode == 0:
                dq_cfg = cfg.dq
                lists = _tile_lists(mask, True, dq_cfg.block_m, dq_cfg.block_n,
                                    margs.dense_kind == 0)  # fmt: skip
                n_tiles = triton.cdiv(Sq, dq_cfg.block_m)
                chunk = _heads_per_chunk(dq_cfg, n_tiles, B * H, H // Hkv, q.device)
                _bwd_dq_kernel[(n_tiles * B * H,)](
                    q, k, v, dout, lse, delta, dq,
                    q.stride(0), q.stride(1), q.stride(2),
                    k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2),
                    dout.stride(0), dout.stride(1), dout.stride(2),
                    dq.stride(0), dq.stride(1), dq.stride(2),
                    lists.full, lists.full_count, lists.part, lists.part_count, lists.full.shape[1],
                    *margs.kernel_args(),
                    Sq, Sk, H, H // Hkv, scale * _LOG2E, scale, chunk,
                    HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
                    **margs.kernel_flags(),
                    num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages,
                )  # fmt: skip
