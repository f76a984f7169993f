"""The block engine: each block of a ring step on the kernel planned for its kind.

A ring step's block says what it is (``BlockMask.pieces``, from ``ringcompile.blocks``), hence its
kind (``registry.mask_kind``), and the ``KernelPlan`` names the kernel of each kind. Plain pieces
(full, or causal on a square) may go to a fused SDPA kernel (``sdpa_blocks``: cuDNN on CUDA) and
a varlen block (packed documents) to a varlen kernel (``varlen``: FA2 on CUDA) as one
piece over all its rows and keys (or, where each row is one document, as the plain pieces of its
position rules); a chunked block that is the same piece in every chunk (``blocks.chunk_piece``)
goes to the fused SDPA kernel as one batch of chunks (``ChunkBatch``: views where the layout
allows); each returns (out, lse), merged here by ``merge_block``. The
kernels that merge themselves (Triton, the reference) do it inside their epilogue, and take the
varlen blocks a varlen kernel cannot (``varlen.segments`` is None). All write the one running state
(``ForwardState``), so a call may mix them step by step. A first block's output stays in the inputs' dtype until
the next merge reads it, and a last step whose pieces hold disjoint rows writes the answer in the
inputs' dtype: at W = 2 one merge pass is all the forward adds to its two fused calls.

Backward: a plain piece's fused backward takes the final (out, lse) of its rows and returns its
dq, dk, dv in the input dtype; they go into the ring's gradient sums (``grad_sum.GradSum``) as
they are, which sum them in fp32 with as few passes as the contributions allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringcompile.blocks import Piece, chunk_piece, disjoint, layout_block_pieces
from ringcompile.kernels.grad_sum import sums_over
from ringcompile.kernels.interface import AttentionKernels, ForwardState
from ringcompile.kernels.merge import merge_block
from ringcompile.kernels.registry import BLOCK_KINDS, KernelPlan, mask_kind
from ringcompile.kernels.varlen import Segments, segments
from ringcompile.masks import BlockMask

__all__ = ["BlockEngine", "ChunkBatch"]


@dataclass
class _Prepared:
    """What the backward steps need of the output: itself for plain pieces, delta for masked
    blocks (made at the first masked block)."""

    out: torch.Tensor
    dout: torch.Tensor
    masked: AttentionKernels
    _delta: object = None

    @property
    def delta(self):
        if self._delta is None:
            self._delta = self.masked.backward_prepare(self.out, self.dout)
        return self._delta


def _materialize(state: ForwardState) -> None:
    """Make the state's ``out`` hold its output in the accumulation dtype, contiguous (what the
    masked kernels read)."""
    if state.pending is not None:
        state.out = state.pending.to(state.lse.dtype, memory_format=torch.contiguous_format)
        state.pending = None


def _rule_pieces(mask: BlockMask) -> tuple[Piece, ...] | None:
    """The plain pieces of the block under its position rules alone (None where they are more
    than causality: a window, chunks, a prefix)."""
    r = mask.rules
    if mask.positions_key is None or r.window is not None or r.chunk or r.prefix:
        return None
    return layout_block_pieces(*mask.positions_key, r.causal)


@dataclass(frozen=True)
class ChunkBatch:
    """A block that is the same plain ``piece`` in every run of ``m`` rows and keys (one run per
    chunk: ``blocks.chunk_piece``), run as one fused call over a batch of ``B * n`` runs. Rows or
    keys of a run that the piece leaves out (a strictly causal piece's first row and last key)
    come back as rows that saw nothing and zero gradients."""

    m: int
    piece: Piece

    def forward(self, plain, q, k, v, scale: float):
        p, B = self.piece, q.shape[0]
        out, lse = plain.forward(self._batch(q, p.rows), self._batch(k, p.keys),
                                 self._batch(v, p.keys), p.causal, scale)  # fmt: skip
        return self._unbatch(out, B, p.rows), self._unbatch(lse, B, p.rows, float("-inf"))

    def backward(self, plain, dout, q, k, v, out, lse, scale: float):
        p, B = self.piece, q.shape[0]
        dq, dk, dv = plain.backward(
            *(self._batch(t, p.rows) for t in (dout, q)),
            *(self._batch(t, p.keys) for t in (k, v)),
            *(self._batch(t, p.rows) for t in (out, lse)),
            p.causal, scale,
        )  # fmt: skip
        return (
            self._unbatch(dq, B, p.rows),
            self._unbatch(dk, B, p.keys),
            self._unbatch(dv, B, p.keys),
        )

    def _batch(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """(B, H, n * m[, D]) -> (B * n, H, m[, D]), then ``part`` of each run: a view where B is
        1 or the rows are outer to the heads in memory (a model's (B, S, H, D) projections),
        else a copy."""
        return x.unflatten(2, (-1, self.m)).transpose(1, 2).flatten(0, 1)[:, :, part]

    def _unbatch(self, x: torch.Tensor, B: int, part: slice, fill: float = 0.0) -> torch.Tensor:
        """The inverse of ``_batch``, ``fill`` where ``part`` left rows out."""
        if (part.start, part.stop) != (0, self.m):
            pad = (part.start, self.m - part.stop)
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + pad, value=fill)
        return x.unflatten(0, (B, -1)).transpose(1, 2).flatten(2, 3)


def _chunk_batch(mask: BlockMask) -> ChunkBatch | None:
    """The chunks of a block whose mask is its chunked position rules alone, where each chunk is
    the same plain piece (``blocks.chunk_piece``)."""
    if (mask.q_doc is not None or mask.k_valid is not None or mask.dense is not None
            or mask.softcap):  # fmt: skip
        return None
    sq, sk = mask.q_pos.numel(), mask.k_pos.numel()
    found = chunk_piece(mask.progression, mask.rules, sq, sk, mask.seq_len)
    return None if found is None else ChunkBatch(*found)


class BlockEngine:
    """:class:`AttentionKernels` that computes each block on its kind's kernel in ``plan``."""

    def __init__(self, plan: KernelPlan):
        self.plan = plan
        made = {}  # one object per kernel, shared by the kinds it computes
        self.kernels = {kind: made.setdefault(plan.spec(kind).name, plan.spec(kind).make())
                        for kind in BLOCK_KINDS}  # fmt: skip
        # the kernel that owns the state's form and the backward's delta
        self.masked = self.kernels["masked"]
        self.plain = self.kernels["plain"]

    @property
    def fused_plain(self) -> bool:
        return self.plan.fused_plain

    def fused(self, mask: BlockMask) -> bool:
        """Whether the block goes whole to a kernel that returns (out, lse) (the heads of a part
        of it are then as cheap as all of them)."""
        return not self.plan.spec(mask_kind(mask)).merges or self._chunks(mask) is not None

    def _chunks(self, mask: BlockMask) -> ChunkBatch | None:
        """A masked block's ``ChunkBatch`` where the fused plain kernel can take it."""
        if mask.pieces is not None or mask.varlen or not self.fused_plain:
            return None
        return _chunk_batch(mask)

    def _parts(self, mask: BlockMask, q: torch.Tensor, k: torch.Tensor):
        """``(kernel that merges, None, None)``, or ``(None, pieces, how)`` for the engine to
        compute and merge: plain pieces (``how`` None), a varlen block as one piece over all its
        rows and keys with its ``Segments`` (no piece: no row sees a key), or a chunked block as
        one piece with its ``ChunkBatch``."""
        kind = mask_kind(mask)
        if chunks := self._chunks(mask):
            return None, (Piece(0, q.shape[2], 0, k.shape[2], mask.rules.causal),), chunks
        if self.plan.spec(kind).merges:
            return self.kernels[kind], None, None
        if kind == "plain":
            return None, mask.pieces, None
        seg = segments(mask, q.shape[0])
        if seg is None:
            return self.masked, None, None
        if seg.one_document and self.fused_plain and (pieces := _rule_pieces(mask)) is not None:
            # documents that hide nothing (unpacked rows): the plain block of the position rules
            return None, pieces, None
        return None, () if seg.empty else (Piece(0, q.shape[2], 0, k.shape[2], False),), seg

    def _forward_piece(self, q, k, v, p: Piece, how: Segments | ChunkBatch | None,
                       scale: float):  # fmt: skip
        if isinstance(how, ChunkBatch):
            return how.forward(self.plain, q, k, v, scale)
        if how is not None:
            return self.kernels["varlen"].forward(q, k, v, how, scale)
        return self.plain.forward(q[:, :, p.rows], k[:, :, p.keys], v[:, :, p.keys], p.causal,
                                  scale)  # fmt: skip

    def _backward_piece(self, dout, q, k, v, out, lse, p: Piece,
                        how: Segments | ChunkBatch | None, scale: float):  # fmt: skip
        if isinstance(how, ChunkBatch):
            return how.backward(self.plain, dout, q, k, v, out, lse, scale)
        if how is not None:
            return self.kernels["varlen"].backward(dout, q, k, v, out, lse, how, scale)
        rows, keys = p.rows, p.keys
        return self.plain.backward(dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                   out[:, :, rows], lse[:, :, rows], p.causal, scale)  # fmt: skip

    def forward_init(self, q: torch.Tensor) -> ForwardState:
        return self.masked.forward_init(q)

    def forward_step(self, state: ForwardState, q, k, v, mask: BlockMask, scale: float,
                     last: bool) -> None:  # fmt: skip
        merging, pieces, how = self._parts(mask, q, k)
        if merging is not None:
            _materialize(state)
            merging.forward_step(state, q, k, v, mask, scale, last)
            return
        if not pieces:
            return
        Sq = q.shape[2]
        whole = (pieces[0].row_start, pieces[0].row_stop) == (0, Sq)  # the first piece's rows
        if state.steps == 0 and len(pieces) == 1 and whole:
            # The first block stays as the fused kernel returned it: the next merge reads it (no
            # copy into the state first); the call's only block is the answer.
            out, lse = self._forward_piece(q, k, v, pieces[0], how, scale)
            state.lse = lse.to(state.lse.dtype).contiguous()
            state.steps = 1
            if last:
                state.final_out = out  # (the ring gives it q's layout: ``in_layout_of``)
            else:
                state.pending = out
            return
        if state.steps == 0:
            if state.out is None:
                state.out = torch.empty(q.shape, dtype=state.lse.dtype, device=q.device)
            if not whole:  # the first piece fills every row; otherwise start from nothing
                state.out.zero_()
                state.lse.fill_(float("-inf"))
            for i, p in enumerate(pieces):
                self._merge_piece(state.out, state.out, state, q, k, v, p, how, scale,
                                  i == 0 and whole)  # fmt: skip
            state.steps = 1
            return
        old = state.pending if state.pending is not None else state.out
        rows = sorted((p.row_start, p.row_stop) for p in pieces)
        if last and disjoint(rows):
            # The answer in q's dtype at once: each piece's rows merged into it, the others copied
            # (no fp32 write and conversion pass after).
            final = torch.empty_like(q)  # (in q's layout, the op's output's)
            for p in pieces:
                self._merge_piece(old, final, state, q, k, v, p, how, scale, False)
            for lo, hi in zip([0] + [b for _, b in rows], [a for a, _ in rows] + [Sq]):
                if lo < hi:
                    final[:, :, lo:hi].copy_(old[:, :, lo:hi])
            state.final_out, state.pending = final, None
        else:
            if state.pending is not None:
                if state.out is None:
                    state.out = torch.empty(q.shape, dtype=state.lse.dtype, device=q.device)
                if not (len(pieces) == 1 and whole):  # rows no merge writes need the copy
                    state.out.copy_(state.pending)
                    old = state.out
                state.pending = None
            for p in pieces:
                self._merge_piece(old, state.out, state, q, k, v, p, how, scale, False)
                old = state.out
        state.steps += 1

    def _merge_piece(self, old, dst, state: ForwardState, q, k, v, p, how, scale: float,
                     first: bool) -> None:  # fmt: skip
        out, lse = self._forward_piece(q, k, v, p, how, scale)
        merge_block(old, dst, state.lse, p.row_start, out, lse, first)

    def forward_finish(self, state: ForwardState, dtype: torch.dtype):
        if state.pending is not None:  # no merge came after the first block
            state.final_out, state.pending = state.pending, None
        return self.masked.forward_finish(state, dtype)

    def backward_prepare(self, out: torch.Tensor, dout: torch.Tensor) -> _Prepared:
        return _Prepared(out, dout, self.masked)

    def backward_step(self, q, k, v, dout, lse, prepared: _Prepared, mask: BlockMask,
                      scale: float, dq, dk, dv, dkv_fresh: bool = False) -> None:  # fmt: skip
        merging, pieces, how = self._parts(mask, q, k)
        if merging is not None:
            merging.backward_step(q, k, v, dout, lse, prepared.delta, mask, scale, dq, dk, dv,
                                  dkv_fresh)  # fmt: skip
            return
        # each piece's gradients go into the sums as the fused kernel returned them
        (dq, dk, dv), given = sums_over(dq, dk, dv, dkv_fresh)
        for p in pieces:
            rows, keys = p.rows, p.keys
            dq_p, dk_p, dv_p = self._backward_piece(dout, q, k, v, prepared.out, lse, p, how,
                                                    scale)  # fmt: skip
            dq.add(dq_p, (slice(None), slice(None), rows))
            dk.add(dk_p, (slice(None), slice(None), keys))
            dv.add(dv_p, (slice(None), slice(None), keys))
        for s in given:
            s.flush()
