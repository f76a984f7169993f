"""Attention masks: one typed value from the passes to the kernels.

Causal, sliding-window, padding and packed-document masks are all ``allowed[q, k] = f(facts[q],
facts[k])`` with facts = (global position, document id, key validity). A ring step only needs the
facts of its query and key tokens, a few integers per token, never an S x S tensor. A dense mask
is the exact fallback for masks that are not such a function.

- :class:`PositionRules`: what a mask says about global positions alone (causal, window, chunks):
  hashable, as the ring's step plan and the kernels' tile lists are functions of it and the layout.
- :class:`AttentionMask`: one attention call's whole mask, the rules plus per-token facts and a
  dense fallback. The passes hold it over FX nodes (``lift_masks`` makes it), ``ring_attention``
  over tensors; it crosses the custom-op boundary as one list of tensors and one list of ints
  (:meth:`AttentionMask.encode` / :meth:`AttentionMask.decode`), nowhere else.
- :class:`BlockMask`: one ring step's view, the rules over the block's query and key positions.

The rules, all of which must hold for ``q`` to see ``k`` (a prefix is or-ed with the position
rules before them), are written here once in Python
(:meth:`PositionRules.allows`, :meth:`BlockMask.allowed`) and once for the Triton kernels
(``kernels/triton/mask_args._token_rules``); ``tests/test_kernels_triton.py`` ties the two, the kernels' tile
lists and :meth:`PositionRules.any_allowed` together on random facts:

- ``k_pos < seq_len`` (positions past the sequence are layout padding; the outputs of queries at
  such positions are dropped, so they may be anything);
- causal: ``k_pos <= q_pos``;
- window ``(left, right)``: ``q_pos - left <= k_pos <= q_pos + right``; -1 means unbounded (the
  flash-attention convention: a Mistral/HF ``sliding_window=w`` is ``left = w - 1``);
- chunks of ``c`` (Llama 4's chunked attention): ``q_pos // c == k_pos // c``; 0 means none;
- a prefix of ``p`` (prefix-LM): keys at ``k_pos < p`` are seen by every query whatever the three
  rules above say (they are ``or``-ed with them; the rules below still hold); 0 means none;
- documents: ``q_doc == k_doc``;
- validity: ``k_valid`` (key padding);
- dense: boolean (True = keep) or additive float, broadcastable to (B, H, Sq, Sk).

A mask may also cap the scores (``softcap``, Gemma 2's ``attn_logit_softcapping``): each score
``s = scale * q.k`` becomes ``softcap * tanh(s / softcap)`` before the mask applies (a dense
additive mask or key bias is added after the cap, as eager Gemma 2 and flex's score_mod add it).

Beside the rules, a mask may add to the scores a bias that depends on the key alone (ALiBi as
transformers builds it: ``slope_h * position_k``, a softmax ignoring the query's share): a
per-token fact that travels with its key, which a block sees as an additive dense mask broadcast
over its queries. And it says what a query row that the rules leave with no key gets: 0 (SDPA's
math backend under a boolean mask) or the mean of every value (SDPA under an additive mask that
fills hidden keys with finfo.min: every score of such a row rounds to that one value).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

from ringcompile import mask_mod
from ringcompile.blocks import Piece, restrict_keys

__all__ = ["AttentionMask", "BlockMask", "POSITION_NONE", "PositionRules"]


# Beyond every real position (int64): "no key", "unbounded", an empty cache slot.
POSITION_NONE = 2**62


@dataclasses.dataclass(frozen=True)
class PositionRules:
    """What a mask says about global positions alone."""

    causal: bool = False
    window_left: int = -1  # key >= query - window_left; -1: unbounded
    window_right: int = -1  # key <= query + window_right; -1: unbounded
    chunk: int = 0  # query and key in one chunk of this many positions; 0: no chunks
    prefix: int = 0  # keys before this position are seen by every query (or-ed); 0: none

    @classmethod
    def of(cls, causal: bool, window: tuple[int, int] | None, chunk: int | None = None,
           prefix: int | None = None) -> PositionRules:  # fmt: skip
        wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
        return cls(bool(causal), wl, wr, int(chunk or 0), int(prefix or 0))

    def __str__(self) -> str:
        parts = ["causal" if self.causal else "bidirectional"]
        if self.window:
            parts.append(f"window {self.window}")
        if self.chunk:
            parts.append(f"chunks of {self.chunk}")
        if self.prefix:
            parts.append(f"or a prefix of {self.prefix}")
        return ", ".join(parts)

    @property
    def window(self) -> tuple[int, int] | None:
        """``(left, right)``, or None without a window."""
        if self.window_left < 0 and self.window_right < 0:
            return None
        return self.window_left, self.window_right

    def allows(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
               seq_len: int | None) -> torch.Tensor:  # fmt: skip
        """Elementwise over broadcast ``q_pos`` and ``k_pos``: whether the query sees the key.
        ``seq_len`` None: no layout padding."""
        ok = torch.ones(torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool,
                        device=q_pos.device)  # fmt: skip
        if self.causal:
            ok = ok & (k_pos <= q_pos)
        if self.window_left >= 0:
            ok = ok & (k_pos >= q_pos - self.window_left)
        if self.window_right >= 0:
            ok = ok & (k_pos <= q_pos + self.window_right)
        if self.chunk > 0:
            ok = ok & (torch.div(q_pos, self.chunk, rounding_mode="floor")
                       == torch.div(k_pos, self.chunk, rounding_mode="floor"))  # fmt: skip
        if self.prefix > 0:
            ok = ok | (k_pos < self.prefix)
        if seq_len is not None:
            ok = ok & (k_pos < seq_len)
        return ok

    def bounds(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions ``[lo, hi]`` that causality, the window and the chunks let each query
        see (a prefix aside: it is or-ed with them); ``POSITION_NONE`` bounds where unbounded."""
        q = q_pos
        lo = q - self.window_left if self.window_left >= 0 else torch.full_like(q, -POSITION_NONE)
        hi = q + self.window_right if self.window_right >= 0 else torch.full_like(q, POSITION_NONE)
        if self.causal:
            hi = torch.minimum(hi, q)
        if self.chunk > 0:
            start = torch.div(q, self.chunk, rounding_mode="floor") * self.chunk
            lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + self.chunk - 1)
        return lo, hi

    def any_allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: int) -> bool:
        """Whether any (query, key) pair passes, in O((Sq + Sk) log Sk) instead of Sq x Sk.

        Queries at padded positions are left out: their outputs are dropped."""
        q = q_pos[q_pos < seq_len]
        k = torch.sort(k_pos[k_pos < seq_len]).values
        if q.numel() == 0 or k.numel() == 0:
            return False
        if self.prefix > 0 and bool(k[0] < self.prefix):
            return True
        lo, hi = self.bounds(q)
        # smallest key >= lo for each query; the pair exists if that key is <= hi
        idx = torch.searchsorted(k, lo)
        has = idx < k.numel()
        first = k[idx.clamp(max=k.numel() - 1)]
        return bool((has & (first <= hi)).any())


T = TypeVar("T")  # torch.Tensor at run time, torch.fx.Node in the passes


@dataclasses.dataclass(frozen=True)
class AttentionMask(Generic[T]):
    """One attention call's mask: position rules, per-token facts of this rank's tokens (which
    travel with its keys) and a dense fallback (this rank's rows over all keys in natural order)."""

    rules: PositionRules = PositionRules()
    document_ids: T | None = None  # (B, S_local) integers: tokens see keys of their own document
    key_padding_mask: T | None = None  # (B, S_local) bool: False marks a padding key no query sees
    # (B|1, H|1, 1, S_local) float added to every score of its key; not with ``dense``
    key_bias: T | None = None
    dense: T | None = None  # (B|1, H|1, S_local, seq_len) bool (True = keep) or additive float
    # rows the facts leave with no key: the mean of every value (True) or 0 (False)
    empty_rows_mean: bool = False
    # > 0: every score s becomes softcap * tanh(s / softcap) before the mask applies
    softcap: float = 0.0
    # flex's ``mask_mod(b, h, q_idx, kv_idx, *mask_buffers) -> bool`` at global positions,
    # evaluated on each ring step's block (``ringcompile.mask_mod``); and-ed with the rules and
    # facts. ``mask_buffers``: the full tensors it reads. Not with ``dense`` or ``key_bias``.
    mask_mod: Callable | None = None
    mask_buffers: tuple[T, ...] = ()

    # The op's encoding: these tensors in this order and the mask_mod's buffers, then the rules,
    # the flag and the mask_mod's key (0: none) as ints, then the soft cap.
    _TENSORS = ("dense", "document_ids", "key_padding_mask", "key_bias")

    def __post_init__(self):
        if self.key_bias is not None and self.dense is not None:
            raise ValueError("a key bias and a dense mask at once: add the bias to the dense mask")
        if self.softcap < 0:
            raise ValueError(f"softcap must be positive (0: none), got {self.softcap}")
        if self.softcap and self.empty_rows_mean:
            # the mean rows' gradients are sums over every key (``ring/empty_rows.py``), which a
            # cap's per-score derivative breaks; a dense additive mask computes such rows exactly
            raise ValueError("a soft cap with empty_rows='mean': pass the mask as a dense "
                             "additive attn_mask instead")  # fmt: skip
        if self.mask_mod is not None and (self.dense is not None or self.key_bias is not None
                                          or self.empty_rows_mean):  # fmt: skip
            raise ValueError("a mask_mod with an attn_mask, a key_bias or empty_rows='mean': "
                             "fold them into the mask_mod, or pass one dense attn_mask")  # fmt: skip

    @property
    def token_facts(self) -> dict[str, T]:
        """The per-token facts present, by name (each one's last dim is its tokens)."""
        return {name: t for name in ("document_ids", "key_padding_mask", "key_bias")
                if (t := getattr(self, name)) is not None}  # fmt: skip

    @property
    def masked(self) -> bool:
        """Whether blocks need more than the position rules (the masked kernels)."""
        r = self.rules
        return (bool(self.token_facts) or self.dense is not None or r.window is not None
                or r.chunk > 0 or r.prefix > 0 or self.softcap > 0
                or self.mask_mod is not None)  # fmt: skip

    def encode(self) -> tuple[list[torch.Tensor | None], list[int], float]:
        """The op's three mask arguments."""
        r = self.rules
        fn = self.mask_mod
        return ([getattr(self, name) for name in self._TENSORS] + list(self.mask_buffers),
                [int(r.causal), r.window_left, r.window_right, r.chunk, r.prefix,
                 int(self.empty_rows_mean), mask_mod.register(fn) if fn is not None else 0],
                float(self.softcap))  # fmt: skip

    @classmethod
    def decode(cls, tensors: list[torch.Tensor | None], ints: list[int],
               softcap: float) -> AttentionMask:  # fmt: skip
        causal, wl, wr, chunk, prefix, empty_rows_mean, fn = ints
        n = len(cls._TENSORS)
        return cls(PositionRules(bool(causal), int(wl), int(wr), int(chunk), int(prefix)),
                   **dict(zip(cls._TENSORS, tensors[:n])),
                   empty_rows_mean=bool(empty_rows_mean), softcap=float(softcap),
                   mask_mod=mask_mod.lookup(fn) if fn else None,
                   mask_buffers=tuple(tensors[n:]))  # fmt: skip

    def agreement(self) -> list[tuple[str, int]]:
        """What every rank of a ring must state alike, as (what, value)."""
        r = self.rules
        return [("is_causal", int(r.causal)), ("window_left", r.window_left),
                ("window_right", r.window_right), ("chunk", r.chunk), ("prefix", r.prefix),
                ("has attn_mask", int(self.dense is not None)),
                ("has document_ids", int(self.document_ids is not None)),
                ("has key_padding_mask", int(self.key_padding_mask is not None)),
                ("has key_bias", int(self.key_bias is not None)),
                ("has mask_mod", int(self.mask_mod is not None)),
                ("mask_mod buffers", len(self.mask_buffers)),
                ("empty rows get the mean", int(self.empty_rows_mean)),
                ("softcap (float64 bits)", _float_bits(self.softcap))]  # fmt: skip


def _float_bits(x: float) -> int:
    """A float as the int64 of its bits: the agreement compares integers, exactly."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _keys_from(progression: tuple[int, int, int], start: int) -> tuple[int, int, int]:
    a, b, step = progression
    return a, b + start * step, step


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """What decides which keys of one key block each query of one query block may see."""

    q_pos: torch.Tensor  # (Sq,) int64 global positions of the queries
    k_pos: torch.Tensor  # (Sk,) int64 global positions of the keys
    seq_len: int  # keys at positions >= seq_len are padding
    rules: PositionRules = PositionRules()
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
    # (first query position, first key position, step) when both sides' positions grow by one
    # step per token (``blocks.layout_progression``): the rules are then a band of ``i - j`` in
    # each document and chunk, what variable-length kernels compute (``kernels.varlen``)
    progression: tuple[int, int, int] | None = None
    # The tensor ``q_doc`` was read from, as the op was given it: what is derived from the
    # documents (``kernels.varlen.Segments``) is kept while this one tensor is unchanged
    documents_source: torch.Tensor | None = None
    softcap: float = 0.0  # AttentionMask.softcap

    @property
    def varlen(self) -> bool:
        """Whether the block is a batch of variable-length problems, one per document: documents
        and position rules are its whole mask (no key padding, no dense mask or bias), and its
        positions are one progression on both sides. (Windows and chunks alone are such a batch
        too, but our Triton kernels run them faster than FA2's varlen kernel:
        benchmarks/RESULTS.md; chunks that are one square each go to the plain kernel as a batch
        instead, ``kernels.engine.ChunkBatch``.)"""
        return (self.q_doc is not None and self.pieces is None and self.k_valid is None
                and self.dense is None and self.progression is not None
                and not self.softcap and not self.rules.prefix)  # fmt: skip

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
            progression=None if self.progression is None else _keys_from(self.progression, start),
        )

    def allowed(self) -> torch.Tensor:
        """Boolean (B|1, Sq, Sk) from the per-token facts (the dense mask is not included)."""
        ok = self.rules.allows(self.q_pos[:, None], self.k_pos[None, :], self.seq_len)[None]
        if self.q_doc is not None:
            ok = ok & (self.q_doc[:, :, None] == self.k_doc[:, None, :])
        if self.k_valid is not None:
            ok = ok & self.k_valid[:, None, :].bool()
        return ok
