"""A :class:`~ringcompile.masks.BlockMask` as kernel arguments, and the ``@triton.jit`` helpers
that evaluate it per element on the partial tiles.

A mask reaches the attention kernels as two arguments: :class:`_MaskArgs`, its tensors and
numbers (runtime values: one compiled kernel serves every step of a ring), and
:class:`_MaskFlags`, which rules and facts it has (``tl.constexpr``: code for an absent rule is
not compiled in). The rules are those of ``ringcompile.masks`` (``BlockMask.allowed``), written
again here for tiles; ``tests/test_kernels_triton.py`` ties the two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ringcompile.kernels.triton.jit import _ABSENT, _LN2_K, _LOG2E, _LOG2E_K, _range_of
from ringcompile.masks import BlockMask

_INT32_MAX = 2**31 - 1


class _MaskArgs(NamedTuple):
    """A mask's runtime kernel arguments, one flat tuple (see ``jit._Strides``): tensors (or a
    dummy where absent: its flag is off) with their broadcast strides, and the rules' numbers
    clipped to int32."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    seq_len: int
    window_left: int
    window_right: int
    chunk: int
    prefix: int
    q_doc: torch.Tensor  # (B, Sq)
    k_doc: torch.Tensor  # (B, Sk)
    q_doc_b: int
    q_doc_s: int
    k_doc_b: int
    k_doc_s: int
    k_valid: torch.Tensor  # (B, Sk)
    k_valid_b: int
    k_valid_s: int
    dense: torch.Tensor  # (B, H, Sq, Sk)
    dense_b: int
    dense_h: int
    dense_q: int
    dense_k: int
    offset: torch.Tensor  # (B, H, Sq): an additive dense's row offsets (BlockMask.dense_offset)
    offset_b: int
    offset_h: int
    offset_s: int
    softcap: float  # BlockMask.softcap in log2 units (the scores' units in the kernels)
    inv_softcap: float  # its inverse (0 without a cap)


class _MaskFlags(NamedTuple):
    """Which rules and facts a mask has: one ``tl.constexpr`` argument (each value compiles its
    own kernel)."""

    causal: bool
    has_wl: bool
    has_wr: bool
    has_chunk: bool
    has_prefix: bool
    has_docs: bool
    has_kvalid: bool
    dense_kind: int  # 0 none, 1 boolean keep-mask, 2 additive
    dense_per_key: bool  # the dense mask is alike for every query (a key bias such as ALiBi's)
    # scores are soft-capped (then no tile is full: every score is evaluated): 0 no, 1 exactly,
    # 2 with the GPU's approximate tanh (``jit._soft_cap``)
    softcap: int


def _mask_args(mask: BlockMask, B: int, H: int, Sq: int, Sk: int,
               fast_tanh: bool = False) -> tuple[_MaskArgs, _MaskFlags]:  # fmt: skip
    """The mask's arguments; ``fast_tanh``: a soft cap may use the GPU's approximate tanh."""
    dummy = mask.q_pos  # stands in for absent tensors; never read (its flag is off)
    q_doc = k_doc = k_valid = dense = offset = dummy
    doc_strides = (0, 0, 0, 0)
    k_valid_strides = (0, 0)
    dense_strides = (0, 0, 0, 0)
    offset_strides = (0, 0, 0)
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
    args = _MaskArgs(
        mask.q_pos, mask.k_pos, seq_len, min(rules.window_left, _INT32_MAX),
        min(rules.window_right, _INT32_MAX), max(min(rules.chunk, _INT32_MAX), 1),
        min(rules.prefix, _INT32_MAX), q_doc, k_doc, *doc_strides, k_valid, *k_valid_strides, dense, *dense_strides,
        offset, *offset_strides, mask.softcap * _LOG2E,
        1.0 / (mask.softcap * _LOG2E) if mask.softcap else 0.0,
    )  # fmt: skip
    flags = _MaskFlags(
        causal=rules.causal, has_wl=rules.window_left >= 0, has_wr=rules.window_right >= 0,
        has_chunk=rules.chunk > 0, has_prefix=rules.prefix > 0, has_docs=has_docs, has_kvalid=has_kvalid, dense_kind=dense_kind,
        dense_per_key=dense_kind != 0 and dense_strides[2] == 0,
        softcap=0 if not mask.softcap else 2 if fast_tanh else 1,
    )  # fmt: skip
    return args, flags


@triton.jit
def _token_rules(q_pos, k_pos, mask_args, q_doc, k_doc, k_valid, QUERIES_ON_ROWS: tl.constexpr,
                 MASK: tl.constexpr):  # fmt: skip
    """The rules of ``ringcompile.masks`` (``BlockMask.allowed``) as a boolean tile: queries on
    its rows (or its columns), keys on the other dim. Positions are int32 vectors; the documents
    and key validity vectors are not read where their flag is off."""
    if QUERIES_ON_ROWS:
        qp = q_pos[:, None]
        kp = k_pos[None, :]
    else:
        qp = q_pos[None, :]
        kp = k_pos[:, None]
    ok = kp < mask_args.seq_len
    seen = ok  # the position rules; a prefix is or-ed with them
    # differences of int32 positions below 2**31 cannot overflow
    dist = qp - kp
    if MASK.causal:
        ok = ok & (dist >= 0)
    if MASK.has_wl:
        ok = ok & (dist <= mask_args.window_left)
    if MASK.has_wr:
        ok = ok & (-dist <= mask_args.window_right)
    if MASK.has_chunk:  # positions are >= 0: // floors
        ok = ok & (qp // mask_args.chunk == kp // mask_args.chunk)
    if MASK.has_prefix:
        ok = ok | (seen & (kp < mask_args.prefix))
    if MASK.has_docs:
        if QUERIES_ON_ROWS:
            ok = ok & (q_doc[:, None] == k_doc[None, :])
        else:
            ok = ok & (q_doc[None, :] == k_doc[:, None])
    if MASK.has_kvalid:
        if QUERIES_ON_ROWS:
            ok = ok & (k_valid[None, :] != 0)
        else:
            ok = ok & (k_valid[:, None] != 0)
    return ok


@triton.jit
def _add_mask(s, mask, offset):
    """Scores (log2 units) plus an additive mask, less the row's offset: added in natural units,
    as SDPA adds it, so a row the mask fills with finfo.min rounds every score to that value
    and, less the offset (that value), to 0: one weight per key, as SDPA gives it."""
    natural = s * _LN2_K + mask.to(tl.float32)
    return (natural - offset) * _LOG2E_K


@triton.jit
def _dense_tile(mask_args, b, h, q_offs, k_offs, q_ok, k_ok, PER_KEY: tl.constexpr,
                KEYS_FIRST: tl.constexpr):  # fmt: skip
    """The dense mask's tile of batch ``b`` and head ``h``: (queries, keys), or (keys, queries)
    with KEYS_FIRST. A mask alike for every query (stride 0 over them: a key bias such as ALiBi's)
    loads one vector of keys, not a tile of repeats. Out-of-range elements read 0."""
    base = mask_args.dense + b.to(tl.int64) * mask_args.dense_b + h.to(tl.int64) * mask_args.dense_h
    stride_mq = mask_args.dense_q
    stride_mk = mask_args.dense_k
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
            tile = tl.load(
                base + q_offs[None, :] * stride_mq + k_offs[:, None] * stride_mk,
                mask=k_ok[:, None] & q_ok[None, :],
                other=0,
            )
        else:
            tile = tl.load(
                base + q_offs[:, None] * stride_mq + k_offs[None, :] * stride_mk,
                mask=q_ok[:, None] & k_ok[None, :],
                other=0,
            )
    return tile


@triton.jit
def _dense_keep(keep, mask_args, b, h, q_offs, q_ok, k_offs, k_ok, QUERIES_ON_ROWS: tl.constexpr,
                MASK: tl.constexpr):  # fmt: skip
    """A dense mask on a partial tile, queries on its rows (forward, dq) or on its columns (dk/dv):
    a boolean one narrows ``keep``; an additive one's tile is returned, to add to the scores
    (``_ABSENT`` without one)."""
    bias = _ABSENT
    if MASK.dense_kind != 0:
        dense = _dense_tile(mask_args, b, h, q_offs, k_offs, q_ok, k_ok, MASK.dense_per_key,
                            not QUERIES_ON_ROWS)  # fmt: skip
        if MASK.dense_kind == 1:
            keep = keep & (dense != 0)
        else:
            bias = dense
    return keep, bias


@triton.jit
def _row_offsets(mask_args, b, h, q_offs, q_ok, MASK: tl.constexpr):
    """An additive dense mask's offsets of the queries ``q_offs`` (``BlockMask.dense_offset``);
    ``_ABSENT`` without one."""
    row_off = _ABSENT
    if MASK.dense_kind == 2:
        base = (mask_args.offset + b.to(tl.int64) * mask_args.offset_b
                + h.to(tl.int64) * mask_args.offset_h)  # fmt: skip
        row_off = tl.load(base + q_offs * mask_args.offset_s, mask=q_ok, other=0.0)
    return row_off


@triton.jit
def _key_validity(mask_args, b, k_offs, k_ok, MASK: tl.constexpr):
    """Which of the keys ``k_offs`` are valid (nonzero); ``_ABSENT`` if the mask does not say."""
    k_valid = _ABSENT
    if MASK.has_kvalid:
        base = mask_args.k_valid + b * mask_args.k_valid_b
        k_valid = tl.load(base + k_offs * mask_args.k_valid_s, mask=k_ok, other=0)
    return k_valid


@triton.jit
def _docs(mask_args, b, offs, ok, QUERIES: tl.constexpr):
    """The document ids of the queries (or keys) ``offs`` in batch row ``b``."""
    if QUERIES:
        docs = tl.load(mask_args.q_doc + b * mask_args.q_doc_b + offs * mask_args.q_doc_s,
                       mask=ok, other=0)  # fmt: skip
    else:
        docs = tl.load(mask_args.k_doc + b * mask_args.k_doc_b + offs * mask_args.k_doc_s,
                       mask=ok, other=0)  # fmt: skip
    return docs


@triton.jit
def _row_tile_facts(mask_args, b, offs, ok, QUERIES: tl.constexpr, MASK: tl.constexpr):
    """What the partial tiles of a row tile's lists compare with besides positions: its tokens'
    documents and their range, and the keys' validity (queries, or keys with QUERIES off;
    ``_ABSENT`` where the mask lacks the fact, and validity for queries)."""
    docs = _ABSENT
    lo = _ABSENT
    hi = _ABSENT
    if MASK.has_docs:
        docs = _docs(mask_args, b, offs, ok, QUERIES)
        lo, hi = _range_of(docs, ok, 0)
    valid = _ABSENT
    if not QUERIES:
        valid = _key_validity(mask_args, b, offs, ok, MASK)
    return docs, lo, hi, valid


@triton.jit
def _listed_tile(entry_ptr, offs, n, mask_args, b, lo, hi, QUERIES: tl.constexpr,
                 BLOCK: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    """The other side's tile at ``entry_ptr`` of a partial list (queries, or keys with QUERIES
    off): its first token, its tokens (``offs`` from there) and which are inside the block (below
    ``n``), their documents, and whether their range meets [lo, hi], the row tile's. Tiles of no
    common document are skipped here per batch row (the tile lists skip those of every batch
    row); without documents the documents are ``_ABSENT`` and ``meet`` a constant True, whose
    branch the compiler drops."""
    start = tl.load(entry_ptr) * BLOCK
    offs = start + offs
    ok = offs < n
    docs = _ABSENT
    meet = True
    if MASK.has_docs:
        docs = _docs(mask_args, b, offs, ok, QUERIES)
        if QUERIES:
            q_lo, q_hi = _range_of(docs, ok, 0)
            k_lo = lo
            k_hi = hi
        else:
            k_lo, k_hi = _range_of(docs, ok, 0)
            q_lo = lo
            q_hi = hi
        meet = (k_lo <= q_hi) & (q_lo <= k_hi)
    return start, offs, ok, docs, meet
