"""Blocks of packed documents as variable-length problems, on FA2's varlen kernels.

A block whose mask is documents with position rules (causal, a window, chunks) and whose
positions grow by one step per token on both sides (``BlockMask.progression``: striped and
contiguous layouts, a ring of one), is one attention problem per document and chunk: its queries
against its keys. Query row ``i`` sees key row ``j`` when ``lo <= j - i <= hi``, one band for
every problem of the block. FA2's varlen kernels take such problems packed end to end
(``cu_seqlens``), each with its causal diagonal and window aligned to its bottom-right corner.

``Segments`` says how: the query rows stay where they are (each run of one document and chunk is
a segment); the keys a segment's rows can see are cut out of its document's keys, which puts the
band's upper edge at the segment's bottom-right corner, and packed end to end (``key_rows``; None
where they already are). Where that does not hold (ids not sorted along a row; a document whose
keys end before the band's edge, as in the first half of the keys of a rank's own block; a window
with no causal edge) it is None and the block goes to the masked kernels, exactly.

Built on the host from the document ids: one copy to the host, the only wait of such a block,
once per ring step and tensor of document ids (a model's layers share one, forward and backward
too). Inside CUDA graph capture nothing may wait: the block then goes to the masked kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ringcompile.masks import BlockMask
from ringcompile.tensor_cache import MISSING, TensorKeyedCache

__all__ = ["FlashVarlenBlocks", "Segments", "VarlenBlocks", "flash_varlen_runs", "segments"]

_INF = math.inf


@dataclass(frozen=True)
class Segments:
    """A documents block as FA2's packed problems (``B * Sq`` query rows, ``B * Sk`` key rows)."""

    cu_q: torch.Tensor  # (n + 1,) int32: segment starts over the query rows, then their count
    cu_k: torch.Tensor  # (n + 1,) int32: the same over the packed keys
    key_rows: torch.Tensor | None  # (cu_k[-1],) int64 rows of the block's keys packed; None: all
    max_q: int
    max_k: int
    keys: int  # packed keys (0: no row sees a key)
    causal: bool  # the band's upper edge is each segment's bottom-right diagonal
    window_left: int  # rows see keys at most this far left of that diagonal; -1: unbounded
    # each batch row's queries and keys are one document: the ids hide nothing, and the block is
    # what its position rules make (the engine then runs their plain pieces)
    one_document: bool = False

    @property
    def empty(self) -> bool:
        return self.keys == 0

    def pack_keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B * Sk, Hkv, D) key rows -> (keys, Hkv, D) packed."""
        return x if self.key_rows is None else x.index_select(0, self.key_rows)

    def unpack_keys(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """(keys, Hkv, D) packed -> (rows, Hkv, D), zero where no segment took a key."""
        if self.key_rows is None:
            return x
        return x.new_zeros((rows, *x.shape[1:])).index_copy_(0, self.key_rows, x)


def _band(progression: tuple[int, int, int], rules) -> tuple[float, float]:
    """``(lo, hi)`` with query row i seeing key row j iff ``lo <= j - i <= hi`` under the
    position rules, when ``q_pos = a + step * i`` and ``k_pos = b + step * j``."""
    a, b, step = progression
    lo, hi = -_INF, _INF
    if rules.causal:  # b + step j <= a + step i
        hi = (a - b) // step
    if rules.window_right >= 0:
        hi = min(hi, (a - b + rules.window_right) // step)
    if rules.window_left >= 0:  # b + step j >= a + step i - left
        lo = -((b - a + rules.window_left) // step)  # ceil((a - b - left) / step)
    return lo, hi


def _plan(q_doc: torch.Tensor, k_doc: torch.Tensor, mask: BlockMask):
    """The host side of ``Segments`` from CPU document ids (B, Sq) and (B, Sk), or None."""
    (B, Sq), Sk = q_doc.shape, k_doc.shape[1]
    a, b, step = mask.progression
    lo, hi = _band(mask.progression, mask.rules)
    if lo > -_INF and hi == _INF:
        return None  # a left edge alone leaves no corner to align to
    rules = mask.rules
    valid_k = max(0, min(Sk, -((b - mask.seq_len) // step)))
    doc_lo = int(torch.minimum(q_doc.min(), k_doc.min()))
    span = int(torch.maximum(q_doc.max(), k_doc.max())) - doc_lo + 1
    i = torch.arange(Sq)
    j = torch.arange(Sk)
    n_chunks = 1
    q_key, k_key = q_doc - doc_lo, k_doc - doc_lo
    if rules.chunk > 0:
        n_chunks = (max(a + step * Sq, b + step * Sk) // rules.chunk) + 2
        q_key = q_key * n_chunks + (a + step * i) // rules.chunk
        k_key = k_key * n_chunks + (b + step * j) // rules.chunk
    # tokens at positions past the sequence (layout padding, a suffix of each row) last: the
    # queries' outputs are dropped and the keys hidden, so they form groups that match nothing
    per_row = span * n_chunks + 2
    if per_row * B >= 2**62:
        return None
    valid_q = max(0, min(Sq, -((a - mask.seq_len) // step)))
    first = q_doc[:, :1] if valid_q else k_doc[:, :1]
    one_document = bool((q_doc[:, :valid_q] == first).all() & (k_doc[:, :valid_k] == first).all())
    q_key = torch.where(i < valid_q, q_key, per_row - 2)
    k_key = torch.where(j < valid_k, k_key, per_row - 1)
    rows_q = torch.arange(B)[:, None] * per_row
    q_key, k_key = (q_key + rows_q).flatten(), (k_key + rows_q).flatten()
    if bool((q_key.diff() < 0).any()) or bool((k_key.diff() < 0).any()):
        return None  # ids not sorted along a row: a document may come back
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), (q_key.diff() != 0).nonzero()[:, 0] + 1])
    ends = torch.cat([starts[1:], torch.tensor([B * Sq])])
    group = q_key[starts]
    row = starts // Sq
    iq0, iq1 = starts - row * Sq, ends - row * Sq
    j0 = torch.searchsorted(k_key, group) - row * Sk
    j1 = torch.searchsorted(k_key, group, right=True) - row * Sk
    if hi < _INF:
        j1 = torch.minimum(j1, iq1 + int(hi))
    if lo > -_INF:
        j0 = torch.maximum(j0, iq0 + int(lo))
    n_keys = (j1 - j0).clamp(min=0) if lo <= hi else torch.zeros_like(j0)
    seen = n_keys > 0
    if hi < _INF and not bool((j1 - iq1 == hi)[seen].all()):
        return None  # a document's keys end before the band's edge: no one diagonal
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), n_keys.cumsum(0)])
    total = int(cu_k[-1])
    first = (row * Sk + j0)[seen]
    packed = torch.repeat_interleave(first - cu_k[:-1][seen], n_keys[seen]) + torch.arange(total)
    if total == B * Sk and bool((packed == torch.arange(total)).all()):
        packed = None
    return (torch.cat([starts, ends[-1:]]), cu_k, packed, int((ends - starts).max()),
            int(n_keys.max()), total, hi < _INF, int(hi - lo) if lo > -_INF else -1,
            one_document)  # fmt: skip


# Segments by (document ids tensor, the block's positions): the tensor the op was given is the same
# object in every layer of a call and in its backward, and every rank's is (one graph on every
# rank): the keys' ids, which came from another rank, are then the same too.
_cache = TensorKeyedCache(256)


def segments(mask: BlockMask, B: int) -> Segments | None:
    """The block's ``Segments`` (B: the batch its queries hold), or None: the masked kernels."""
    if not mask.varlen:
        return None
    device = mask.q_pos.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    src = mask.documents_source
    facts = (mask.positions_key, mask.rules, mask.seq_len, B, mask.q_pos.numel(),
             mask.k_pos.numel(), mask.q_pos.device)  # fmt: skip
    cacheable = src is not None and mask.positions_key is not None
    if cacheable and (hit := _cache.get(src, *facts)) is not MISSING:
        return hit
    q_doc, k_doc = mask.q_doc.expand(B, -1), mask.k_doc.expand(B, -1)
    both = torch.cat([q_doc.flatten(), k_doc.flatten()]).to(torch.int64).cpu()
    plan = _plan(both[: q_doc.numel()].view(B, -1), both[q_doc.numel() :].view(B, -1), mask)
    seg = None
    if plan is not None:
        cu_q, cu_k, packed, max_q, max_k, keys, causal, window_left, one_document = plan

        def to_device(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            t = t.to(dtype)
            if device.type == "cuda":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)

        seg = Segments(to_device(cu_q, torch.int32), to_device(cu_k, torch.int32),
                       None if packed is None else to_device(packed, torch.int64), max_q,
                       max(max_k, 1), keys, causal, window_left, one_document)  # fmt: skip
    if cacheable:
        _cache.put(src, *facts, value=seg)
    return seg


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B * S, H, D): a view where x is laid out (B, S, H, D), else a copy."""
    B, H, S, D = x.shape
    return x.transpose(1, 2).reshape(B * S, H, D)


class VarlenBlocks:
    """A documents block on a varlen kernel: its output and lse as the ring's merge takes them,
    its gradients as the ring's sums take them. Subclasses give the kernel's two calls."""

    name = "varlen"

    def forward(self, q, k, v, seg: Segments, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, H, Sq, D), lse (B, H, Sq))``; rows that see no key: lse -inf."""
        B, H, Sq, D = q.shape
        out, lse = self.varlen_forward(_rows(q), seg.pack_keys(_rows(k)),
                                       seg.pack_keys(_rows(v)), seg, scale)  # fmt: skip
        lse = lse.view(H, B, Sq).transpose(0, 1)
        # FA2 gives a row that sees no key lse = +inf; the ring's merge reads -inf as "nothing"
        lse = lse.masked_fill(lse == _INF, -_INF)
        return out.view(B, Sq, H, D).transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        """``(dq, dk, dv)`` of the block, given the final ``out`` and ``lse`` of its rows."""
        B, H, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        # rows that saw no key anywhere (-inf) take no share of any key: +inf, as FA2 writes them
        lse = lse.masked_fill(lse == -_INF, _INF).transpose(0, 1).reshape(H, B * Sq).contiguous()
        dq, dk, dv = self.varlen_backward(
            _rows(dout), _rows(q), seg.pack_keys(_rows(k)), seg.pack_keys(_rows(v)), _rows(out),
            lse, seg, scale,
        )  # fmt: skip
        dk, dv = (seg.unpack_keys(t, B * Sk).view(B, Sk, Hkv, D).transpose(1, 2) for t in (dk, dv))
        return dq.view(B, Sq, H, D).transpose(1, 2), dk, dv

    def varlen_forward(self, q, k, v, seg: Segments, scale: float):
        """``(out (rows, H, D), lse (H, rows) fp32)`` over packed rows."""
        raise NotImplementedError

    def varlen_backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        """``(dq, dk, dv)`` over packed rows, ``lse`` (H, rows)."""
        raise NotImplementedError


def _windows(seg: Segments) -> dict:
    return {"window_size_left": seg.window_left if seg.window_left >= 0 else None,
            "window_size_right": 0 if seg.causal else None}  # fmt: skip


@functools.cache
def _no_dropout_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # the philox state of a call without dropout: read by no kernel, but typed
    return torch.zeros(2, dtype=torch.uint64, device=device), torch.empty(0, device=device)


class FlashVarlenBlocks(VarlenBlocks):
    name = "flash varlen"

    def varlen_forward(self, q, k, v, seg, scale):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, 0.0, seg.causal, False,
            scale=scale, **_windows(seg),
        )  # fmt: skip
        return out, lse

    def varlen_backward(self, dout, q, k, v, out, lse, seg, scale):
        rng, unused = _no_dropout_rng(q.device)
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, 0.0, seg.causal,
            rng, unused, scale=scale, **_windows(seg),
        )  # fmt: skip


def flash_varlen_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's FA2 takes such blocks: Ampere or newer, head dims in eights, and flash
    SDPA not turned off by the user."""
    if device.type != "cuda" or not torch.backends.cuda.flash_sdp_enabled():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8 and head_dim % 8 == 0
