"""Tile lists: for every tile of the "row" side (query tiles in the forward and the dq kernel, key
tiles in the dk/dv kernel), which tiles of the other side it must visit, full or partial.

Masks. Each step receives per-token facts (:class:`ringcompile.masks.BlockMask`). Before the
attention kernel, a small kernel computes for every row tile two lists of tiles of the other
side: tiles that are *full* (every pair visible: checked with per-tile min/max of the positions,
so positions need not be contiguous or sorted) and tiles that are *partial* (some pair may be
visible). Tiles proven empty are in neither list and cost nothing. Full tiles run without any
mask arithmetic; partial tiles evaluate the rules per element (``mask_args``). Document ids and
key validity enter the lists too, through each tile's range of them: a tile pair inside one
document with only valid keys is full, one that shares no document or holds no valid key is
skipped, so packed documents and padded batches run mostly full tiles; with several batch rows a
tile is full or skipped only if it is so in every row. A dense mask is checked per element: with
one, every non-empty tile is partial, and the tiles a mask of whole rows hides everywhere (False,
-inf) are then dropped from the lists (``_without_hidden_tiles``, a few reductions on the device).
One kernel launch makes a mask's lists; lists made from facts are made each call (facts are
data).

The tile lists of the ring's masks by positions, which repeat every call, are cached
(``_TileListCache``): the host then launches only the attention kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ringcompile.kernels.triton.jit import _POS_HUGE, LAUNCH_OPTIONS, _range_of
from ringcompile.masks import BlockMask


class _TileLists(NamedTuple):
    """Each row tile's lists, as the kernels take them (one tuple argument)."""

    full: torch.Tensor  # (n_rows, n_cols) int32, the first full_count[r] entries of row r used
    full_count: torch.Tensor  # (n_rows,) int32
    part: torch.Tensor
    part_count: torch.Tensor
    stride: int  # of a row of full and part


class _TileSide(NamedTuple):
    """One side's tokens for the tile-list kernel: positions, how many, and the bound from which
    positions count as no token."""

    pos: torch.Tensor
    n_tokens: int
    limit: int


class _TokenFacts(NamedTuple):
    """The token facts the tile lists read: document ids of the row and column tokens and the
    keys' validity, each (batch, tokens) with its batch and token strides (placeholders where
    absent: the kernel's DOC_FACTS and KEY_FACTS are off)."""

    row_doc: torch.Tensor
    row_doc_b: int
    row_doc_s: int
    col_doc: torch.Tensor
    col_doc_b: int
    col_doc_s: int
    key_ok: torch.Tensor
    key_ok_b: int
    key_ok_s: int
    batch_rows: int

    @staticmethod
    def present(mask: BlockMask) -> bool:
        return mask.q_doc is not None or mask.k_valid is not None

    @classmethod
    def of(cls, mask: BlockMask, rows_are_queries: bool) -> _TokenFacts:
        placeholder = mask.q_pos[None]
        batch = 0
        row_doc = col_doc = key_ok = placeholder
        if cls.present(mask):
            batch = max(t.shape[0] for t in (mask.q_doc, mask.k_doc, mask.k_valid) if t is not None)
        if mask.q_doc is not None:
            q_doc, k_doc = mask.q_doc.expand(batch, -1), mask.k_doc.expand(batch, -1)
            row_doc, col_doc = (q_doc, k_doc) if rows_are_queries else (k_doc, q_doc)
        if mask.k_valid is not None:
            key_ok = mask.k_valid.expand(batch, -1)
            if key_ok.dtype == torch.bool:
                key_ok = key_ok.view(torch.uint8)
        return cls(
            row_doc, *row_doc.stride(), col_doc, *col_doc.stride(), key_ok, *key_ok.stride(), batch
        )


@triton.jit
def _tile_lists_kernel(
    rows, cols, n_col_tiles, lists, window_left, window_right, chunk, prefix, facts,
    ROWS_ARE_QUERIES: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_CHUNK: tl.constexpr, HAS_PREFIX: tl.constexpr, FULL_ALLOWED: tl.constexpr,
    DOC_FACTS: tl.constexpr, KEY_FACTS: tl.constexpr,
):  # fmt: skip
    """Each row tile's lists of column tiles: full (every pair allowed) and partial (checked per
    element), from the tiles' position bounds and, with token facts, their ranges of document ids
    and of key validity (keys on the columns, or on the rows with ROWS_ARE_QUERIES off): a pair
    of tiles is full only if every batch row holds one and the same document on both sides and
    only valid keys, and is left out if no batch row holds a document on both sides and a valid
    key. One program per row tile; it reads the column tiles' tokens itself (one launch)."""
    row = tl.program_id(0)
    r_idx = row * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
    r_in = r_idx < rows.n_tokens
    r_pos = tl.load(rows.pos + r_idx, mask=r_in, other=0)
    r_valid = r_in & (r_pos < rows.limit)
    r_lo, r_hi = _range_of(r_pos, r_valid, 0)
    r_full = tl.sum(r_valid.to(tl.int32), axis=0) == ROW_BLOCK
    n_full = tl.zeros([], tl.int32)
    n_part = tl.zeros([], tl.int32)
    for c0 in range(0, n_col_tiles, CHUNK):
        col_tiles = c0 + tl.arange(0, CHUNK)
        inside = col_tiles < n_col_tiles
        # (CHUNK, COL_BLOCK) token indices
        c_idx = col_tiles[:, None] * COL_BLOCK + tl.arange(0, COL_BLOCK)[None, :]
        c_in = c_idx < cols.n_tokens
        c_pos = tl.load(cols.pos + c_idx, mask=c_in, other=0)
        c_valid = c_in & (c_pos < cols.limit)
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
        if HAS_PREFIX:  # or-ed with the position rules: what it shows, before they narrow
            in_prefix = visible & (k_lo < prefix)
            all_prefix = full & (k_hi < prefix)
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
        if HAS_PREFIX:  # (a rule's full needs its visible: the chunks' does)
            full = (full & visible) | all_prefix
            visible = visible | in_prefix
        if DOC_FACTS or KEY_FACTS:
            any_row = col_tiles < 0  # (all False) some batch row has a pair the facts allow
            every_row = col_tiles >= 0  # (all True) every batch row allows every pair
            for f in range(facts.batch_rows):
                row_ok = col_tiles >= 0
                row_all = col_tiles >= 0
                if DOC_FACTS:
                    d = tl.load(facts.row_doc + f * facts.row_doc_b + r_idx * facts.row_doc_s,
                                mask=r_in, other=0)  # fmt: skip
                    d_lo, d_hi = _range_of(d.to(tl.int64), r_in, 0)
                    e = tl.load(facts.col_doc + f * facts.col_doc_b + c_idx * facts.col_doc_s,
                                mask=c_in, other=0)  # fmt: skip
                    e_lo, e_hi = _range_of(e.to(tl.int64), c_in, 1)
                    d_lo = zero + d_lo
                    d_hi = zero + d_hi
                    row_ok = row_ok & (e_lo <= d_hi) & (d_lo <= e_hi)
                    row_all = row_all & (d_lo == d_hi) & (e_lo == e_hi) & (d_lo == e_lo)
                if KEY_FACTS:  # validity's range: hi 0 none valid, lo 1 all valid
                    key_ok = facts.key_ok + f * facts.key_ok_b
                    if ROWS_ARE_QUERIES:
                        ok = tl.load(key_ok + c_idx * facts.key_ok_s, mask=c_in, other=0)
                        v_lo, v_hi = _range_of((ok != 0).to(tl.int64), c_in, 1)
                    else:
                        ok = tl.load(key_ok + r_idx * facts.key_ok_s, mask=r_in, other=0)
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
        base = row * lists.stride
        tl.store(lists.full + base + n_full + tl.cumsum(full_i, axis=0) - 1, col_tiles, mask=full)
        tl.store(lists.part + base + n_part + tl.cumsum(part_i, axis=0) - 1, col_tiles, mask=part)
        n_full += tl.sum(full_i, axis=0)
        n_part += tl.sum(part_i, axis=0)
    tl.store(lists.full_count + row, n_full)
    tl.store(lists.part_count + row, n_part)


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
        size = sum(t.numel() * t.element_size() for t in lists if isinstance(t, torch.Tensor))
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
    if mask.dense is not None and mask.dense.shape[-2] > 1:
        # (new lists: the cached ones, by positions, serve other dense masks too; not for a
        # per-key bias, one row, which hides no tile in practice and would add launches per step)
        lists = _without_hidden_tiles(lists, mask, rows_are_queries, row_block, col_block)
    return lists


def _without_hidden_tiles(lists: _TileLists, mask: BlockMask, rows_are_queries: bool,
                          row_block: int, col_block: int) -> _TileLists:  # fmt: skip
    """``lists`` without the partial tiles that the dense mask (B|1, H|1, Sq, Sk) hides in every
    batch row and head (False, or -inf: a mask_mod's block, say): on the device, no wait for the
    host."""
    dense = mask.dense
    seen = (dense if dense.dtype == torch.bool else dense != float("-inf")).any(0).any(0)
    if not rows_are_queries:
        seen = seen.t()
    n_rows, n_cols = lists.part.shape
    seen = torch.nn.functional.pad(
        seen, (0, n_cols * col_block - seen.shape[1], 0, n_rows * row_block - seen.shape[0])
    )
    tile_seen = seen.view(n_rows, row_block, n_cols, col_block).any(3).any(1)
    listed = torch.arange(n_cols, device=seen.device)[None, :] < lists.part_count[:, None]
    entries = lists.part.clamp(0, n_cols - 1).long()
    keep = listed & tile_seen.gather(1, entries)
    # the kept entries first, in their order
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    part = lists.part.gather(1, order)
    return lists._replace(part=part, part_count=keep.sum(1, dtype=torch.int32))


def _compute_tile_lists(mask: BlockMask, rows_are_queries: bool, row_block: int, col_block: int,
                        full_allowed: bool) -> _TileLists:  # fmt: skip
    # Queries at padding positions still get outputs (the reference computes them), so every
    # query is valid; keys at positions >= seq_len are never visible.
    queries = _TileSide(mask.q_pos, mask.q_pos.numel(), _POS_HUGE.value)
    keys = _TileSide(mask.k_pos, mask.k_pos.numel(), mask.seq_len)
    rows, cols = (queries, keys) if rows_are_queries else (keys, queries)
    n_rows = triton.cdiv(rows.n_tokens, row_block)
    n_cols = triton.cdiv(cols.n_tokens, col_block)
    dev = rows.pos.device
    full = torch.empty((n_rows, n_cols), dtype=torch.int32, device=dev)
    part = torch.empty_like(full)
    full_count = torch.empty(n_rows, dtype=torch.int32, device=dev)
    part_count = torch.empty_like(full_count)
    lists = _TileLists(full, full_count, part, part_count, n_cols)
    rules = mask.rules
    _tile_lists_kernel[(n_rows,)](
        rows, cols, n_cols, lists, rules.window_left, rules.window_right, max(rules.chunk, 1),
        rules.prefix, _TokenFacts.of(mask, rows_are_queries),
        ROWS_ARE_QUERIES=rows_are_queries, ROW_BLOCK=row_block, COL_BLOCK=col_block,
        # (CHUNK x COL_BLOCK tokens per loop iteration)
        CHUNK=max(1, min(64, 4096 // col_block)),
        CAUSAL=rules.causal, HAS_WL=rules.window_left >= 0, HAS_WR=rules.window_right >= 0,
        HAS_CHUNK=rules.chunk > 0, HAS_PREFIX=rules.prefix > 0, FULL_ALLOWED=full_allowed,
        DOC_FACTS=mask.q_doc is not None, KEY_FACTS=mask.k_valid is not None, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return lists
