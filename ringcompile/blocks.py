"""What a ring block is: the plain pieces a block of a position-ruled mask splits into.

A ring step computes one block: this rank's queries against one rank's keys. Under the position
rules alone (causal or not, layout padding; no window, documents, padding mask or dense mask) and
with positions increasing along both sides (every layout: a striped rank holds ``r, r + W, ...``,
a zigzag rank its two chunks in order), the keys a query sees are a prefix of the block's keys, of
length ``c(i)`` that never decreases with the query row ``i``. Such a block is a few **pieces**,
each a rectangle of rows and keys that is either full or top-left causal on a square (row ``a + t``
sees keys ``x .. x + t``): exactly what SDPA's fused kernels compute, with their log-sum-exp.

- empty: no piece (``c == 0``);
- full: one full piece (``c == Sk``);
- causal diagonal (a rank's own block): one causal piece, rows and keys ``[0, S)``;
- strictly causal (a striped block from a later rank): one causal piece ``q[1:]`` x ``k[:-1]``;
- a zigzag block from another rank: one full piece over half the rows or half the keys;
- key halves of the above (the own block's backward parts) and padded keys: a causal piece and
  full pieces beside it.

``None`` means the block needs the per-element rules (the masked kernels).

Chunked attention (Llama 4) is not pieces, but where a block's positions are one progression on
both sides and its chunks fall on equal runs of rows and keys, each chunk is the same piece (full,
causal or strictly causal): a batch of plain blocks, one per chunk (``chunk_piece``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ringcompile.layout import Layout

__all__ = [
    "Piece",
    "plain_pieces",
    "layout_block_pieces",
    "restrict_keys",
    "describe_block",
    "disjoint",
    "layout_progression",
    "chunk_piece",
]

# More pieces than this and a block is cheaper as one masked kernel call.
_MAX_PIECES = 4


@dataclass(frozen=True)
class Piece:
    """Rows ``[row_start, row_stop)`` against keys ``[key_start, key_stop)``: every pair visible,
    or (``causal``) a square where row ``row_start + t`` sees keys up to ``key_start + t``."""

    row_start: int
    row_stop: int
    key_start: int
    key_stop: int
    causal: bool

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def keys(self) -> slice:
        return slice(self.key_start, self.key_stop)


def plain_pieces(q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: int, causal: bool
                 ) -> tuple[Piece, ...] | None:  # fmt: skip
    """The pieces of the block of queries at ``q_pos`` against keys at ``k_pos`` (CPU int64),
    under causality by position and keys ``>= seq_len`` hidden; None if it has no such form."""
    Sq = q_pos.numel()
    if Sq > 1 and not bool((q_pos[1:] > q_pos[:-1]).all()):
        return None
    if k_pos.numel() > 1 and not bool((k_pos[1:] > k_pos[:-1]).all()):
        return None
    nk = int((k_pos < seq_len).sum())  # increasing: the valid keys are a prefix
    if nk == 0:
        return ()
    if not causal:
        return (Piece(0, Sq, 0, nk, False),)
    c = torch.searchsorted(k_pos[:nk].contiguous(), q_pos, right=True).tolist()
    # Rows split into runs where c stays constant (a full piece over keys [0, c)) and runs where
    # it grows by one per row (a causal square, beside a full piece over the keys left of it).
    pieces: list[Piece] = []
    i = 0
    while i < Sq:
        if c[i] == 0:  # sees nothing (c never decreases: only a prefix of rows)
            i += 1
            continue
        j = i + 1
        if j < Sq and c[j] == c[i] + 1:
            while j < Sq and c[j] == c[j - 1] + 1:
                j += 1
            x = c[i] - 1  # row i sees keys 0 .. x
            if x > 0:
                pieces.append(Piece(i, j, 0, x, False))
            pieces.append(Piece(i, j, x, x + j - i, True))
        else:
            while j < Sq and c[j] == c[i]:
                j += 1
            pieces.append(Piece(i, j, 0, c[i], False))
        if len(pieces) > _MAX_PIECES:
            return None
        i = j
    return tuple(pieces)


@functools.lru_cache(maxsize=1024)
def layout_block_pieces(layout: Layout, rank: int, source: int, causal: bool
                        ) -> tuple[Piece, ...] | None:  # fmt: skip
    """The pieces of ``rank``'s queries against ``source``'s keys (made once per ring and step)."""
    return plain_pieces(layout.positions(rank), layout.positions(source), layout.seq_len, causal)


@functools.lru_cache(maxsize=1024)
def layout_progression(layout: Layout, rank: int, source: int) -> tuple[int, int, int] | None:
    """``(first query position, first key position, step)`` when ``rank``'s positions and
    ``source``'s both grow by one ``step`` per token (striped and contiguous layouts; not zigzag,
    whose ranks hold two chunks), else None. Then ``q_pos[i] - k_pos[j]`` depends on ``i - j``
    alone, so a mask of position rules over documents is a band of ``i - j`` within each
    document: what variable-length kernels compute (``kernels.varlen``)."""
    q, k = layout.positions(rank), layout.positions(source)
    steps = torch.cat([q.diff(), k.diff()]).unique()
    if steps.numel() > 1:
        return None
    step = int(steps[0]) if steps.numel() else 1
    return int(q[0]), int(k[0]), step


def chunk_piece(progression: tuple[int, int, int] | None, rules, sq: int, sk: int,
                seq_len: int) -> tuple[int, Piece] | None:  # fmt: skip
    """``(m, piece)`` when a block under chunked position rules (no window or prefix) is the same
    piece in every chunk: queries and keys cut into runs of ``m`` rows, the ``t``-th run of each
    in one chunk, every key inside the sequence, and ``piece`` (rows and keys within a run) a full
    square, a causal square or a strictly causal one. None otherwise.

    With ``q_pos = a + step * i`` and ``k_pos = b + step * j`` (``progression``) and chunks of
    ``C = m * step`` positions, run ``t`` of the queries lies in chunk ``a // C + t`` when
    ``a % C < step`` (and likewise the keys); causality then lets row ``i`` of a run see keys
    ``j <= i + floor((a % C - b % C) / step)``: a causal square when ``a % C >= b % C``, else
    strictly causal (a striped block from a later rank)."""
    C = rules.chunk
    if progression is None or C <= 0 or rules.window is not None or rules.prefix:
        return None
    a, b, step = progression
    if C % step or sq != sk:
        return None
    m = C // step
    if sq % m or a % C >= step or b % C >= step or a // C != b // C:
        return None
    if b + step * (sk - 1) >= seq_len:  # padded keys (an uneven layout's last tokens)
        return None
    if not rules.causal:
        return m, Piece(0, m, 0, m, False)
    if a % C >= b % C:
        return m, Piece(0, m, 0, m, True)
    return (m, Piece(1, m, 0, m - 1, True)) if m > 1 else None  # (m = 1: an empty block)


def restrict_keys(pieces: tuple[Piece, ...] | None, start: int, stop: int
                  ) -> tuple[Piece, ...] | None:  # fmt: skip
    """The same block over its keys ``[start, stop)`` only, keys renumbered from 0."""
    if pieces is None:
        return None
    out: list[Piece] = []
    for p in pieces:
        lo, hi = max(p.key_start, start), min(p.key_stop, stop)
        if lo >= hi:
            continue
        if not p.causal:
            out.append(Piece(p.row_start, p.row_stop, lo - start, hi - start, False))
            continue
        # row row_start + t sees keys key_start .. key_start + t; cut to [lo, hi)
        n = p.row_stop - p.row_start
        t0 = lo - p.key_start  # first row that sees key lo
        t1 = min(n, hi - p.key_start)  # rows from t1 on see every key up to hi
        if t0 >= n:
            continue
        if t0 < t1:
            out.append(Piece(p.row_start + t0, p.row_start + t1, lo - start, lo - start + t1 - t0,
                             True))  # fmt: skip
        if max(t0, t1) < n:
            out.append(Piece(p.row_start + max(t0, t1), p.row_stop, lo - start, hi - start, False))
    return tuple(out)


def disjoint(spans) -> bool:
    """Whether the ``(start, stop)`` ranges share no index: each element is in one at most."""
    ordered = sorted(spans)
    return all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))


def describe_block(pieces: tuple[Piece, ...] | None, sq: int, sk: int) -> str:
    """A block's kind in words: empty, full, causal diagonal, strictly causal, or its pieces."""
    if pieces is None:
        return "masked"
    if not pieces:
        return "empty"
    if len(pieces) == 1:
        p = pieces[0]
        if (p.row_start, p.row_stop, p.key_start, p.key_stop) == (0, sq, 0, sk):
            return "causal diagonal" if p.causal else "full"
        if p.causal and (p.row_start, p.row_stop, p.key_start, p.key_stop) == (1, sq, 0, sk - 1):
            return "strictly causal"
    return " + ".join(
        f"{'causal' if p.causal else 'full'} q[{p.row_start}:{p.row_stop}] x "
        f"k[{p.key_start}:{p.key_stop}]"
        for p in pieces
    )
