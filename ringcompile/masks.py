"""Attention masks as functions of per-token facts.

Causal, sliding-window, padding and packed-document masks are all ``allowed[q, k] = f(facts[q],
facts[k])`` with facts = (global position, document id, key validity). A ring step only needs the
facts of its query and key tokens, a few integers per token, never an S x S tensor. A dense mask
(``dense``) is the exact fallback for masks that are not such a function.

Rules (all that apply must hold for ``q`` to see ``k``):
- ``k_pos < seq_len`` (positions past the sequence are layout padding; the outputs of queries at
  such positions are dropped, so they may be anything);
- causal: ``k_pos <= q_pos``;
- window ``(left, right)``: ``q_pos - left <= k_pos <= q_pos + right``; -1 means unbounded (the
  flash-attention convention: a Mistral/HF ``sliding_window=w`` is ``left = w - 1``);
- documents: ``q_doc == k_doc``;
- validity: ``k_valid`` (key padding);
- dense: boolean (True = keep) or additive float, broadcastable to (B, H, Sq, Sk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import torch

from ringcompile.blocks import Piece, restrict_keys

__all__ = ["BlockMask", "POSITION_NONE", "position_rule_allows"]


# Beyond every real position (int64): "no key", "unbounded", an empty cache slot.
POSITION_NONE = 2**62


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """What decides which keys of one key block each query of one query block may see."""

    q_pos: torch.Tensor  # (Sq,) int64 global positions of the queries
    k_pos: torch.Tensor  # (Sk,) int64 global positions of the keys
    seq_len: int  # keys at positions >= seq_len are padding
    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    q_doc: torch.Tensor | None = None  # (B, Sq) integer document ids
    k_doc: torch.Tensor | None = None  # (B, Sk)
    k_valid: torch.Tensor | None = None  # (B, Sk) bool, False = padding key
    dense: torch.Tensor | None = None  # (B|1, H|1, Sq, Sk) bool or additive float
    # (B|1, H|1, Sq), with an additive ``dense`` only: subtracted from each row's scores after the
    # mask is added, as a softmax allows. The ring gives each row its largest mask value over the
    # keys the positions allow: a row that a mask fills with finfo.min everywhere then keeps its
    # scores at 0, not at finfo.min, where the log-sum-exp of one block (min + log n) rounds back
    # to min and the ring's merges would add the blocks' means instead of averaging them.
    dense_offset: torch.Tensor | None = None
    # Names q_pos and k_pos: masks with equal keys have equal positions (the ring sets it from
    # its layout and ranks), so kernels may reuse what they derived from positions. None: never.
    positions_key: Hashable | None = None
    # What the block is (``ringcompile.blocks``): its plain pieces, which kernels that know only
    # full and causal blocks can compute; None: only the rules above say (a masked block).
    pieces: tuple[Piece, ...] | None = None

    def keys(self, start: int, stop: int) -> BlockMask:
        """The same mask over keys ``[start, stop)`` of the block only."""
        cols = slice(start, stop)
        return dataclasses.replace(
            self,
            k_pos=self.k_pos[cols],
            k_doc=None if self.k_doc is None else self.k_doc[:, cols],
            k_valid=None if self.k_valid is None else self.k_valid[:, cols],
            dense=None if self.dense is None else self.dense[..., cols],
            positions_key=None if self.positions_key is None else (self.positions_key, start, stop),
            pieces=restrict_keys(self.pieces, start, stop),
        )

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    def allowed(self) -> torch.Tensor:
        """Boolean (B|1, Sq, Sk) from the per-token facts (the dense mask is not included)."""
        qp = self.q_pos[:, None]
        kp = self.k_pos[None, :]
        ok = kp < self.seq_len
        if self.causal:
            ok = ok & (kp <= qp)
        if self.window_left >= 0:
            ok = ok & (kp >= qp - self.window_left)
        if self.window_right >= 0:
            ok = ok & (kp <= qp + self.window_right)
        ok = ok[None]
        if self.q_doc is not None:
            ok = ok & (self.q_doc[:, :, None] == self.k_doc[:, None, :])
        if self.k_valid is not None:
            ok = ok & self.k_valid[:, None, :].bool()
        return ok


def position_rule_allows(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    seq_len: int,
    causal: bool,
    window_left: int,
    window_right: int,
) -> bool:
    """Whether any (query, key) pair passes the position rules (causal, window, padding).

    Queries at padded positions are left out: their outputs are dropped. O((Sq + Sk) log Sk).
    """
    q = q_pos[q_pos < seq_len]
    k = torch.sort(k_pos[k_pos < seq_len]).values
    if q.numel() == 0 or k.numel() == 0:
        return False
    lo = q - window_left if window_left >= 0 else torch.full_like(q, -POSITION_NONE)
    hi = q + window_right if window_right >= 0 else torch.full_like(q, POSITION_NONE)
    if causal:
        hi = torch.minimum(hi, q)
    # smallest key >= lo for each query; the pair exists if that key is <= hi
    idx = torch.searchsorted(k, lo)
    has = idx < k.numel()
    first = k[idx.clamp(max=k.numel() - 1)]
    return bool((has & (first <= hi)).any())
