"""Ulysses as ``torch.library`` ops: ``ringcompile::ulysses_attention`` and its backward, one op
each with its own autograd, so every rank issues the same all-to-alls in the same order whatever
the compiler does around them.

Forward: the ranks agree on shapes and options (one small all-gather: a mismatch raises on every
rank instead of pairing unequal all-to-alls), q, k and v go to heads, the facts are gathered, a
ring of one attends over the whole sequence in natural order, and the output comes back. The op
also returns what the backward needs in the heads' form (q, k, v, out, lse), so the backward sends
only dout there and dq, dk, dv back. The options and the mask's encoding are the ring op's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringcompile.group import resolve_group_name
from ringcompile.kernels import accumulation_dtype
from ringcompile.layout import Layout, make_layout
from ringcompile.masks import AttentionMask
from ringcompile.ring.backward import ring_backward
from ringcompile.ring.call import RankCall
from ringcompile.ring.comm import GroupRing, LocalRing
from ringcompile.ring.forward import agreement, ring_forward
from ringcompile.ring.op import NOT_CUDAGRAPHS, OP_OPTIONS
from ringcompile.ulysses.exchange import from_heads, to_heads
from ringcompile.ulysses.heads import HeadSplit

__all__ = ["ulysses_attention_op", "ulysses_attention_backward_op"]


@dataclass(frozen=True)
class UlyssesCall:
    """One rank's part of one Ulysses call: its group, the layout of its tokens, the heads."""

    group: dist.ProcessGroup | None
    layout: Layout
    split: HeadSplit

    @classmethod
    def make(cls, heads: int, kv_heads: int, layout_name: str, seq_len: int,
             group_name: str) -> UlyssesCall:  # fmt: skip
        pg = resolve_group_name(group_name)
        size = pg.size() if pg is not None else 1
        return cls(pg, make_layout(layout_name, seq_len, size), HeadSplit.of(heads, kv_heads, size))

    @property
    def rank(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @property
    def q_heads(self) -> tuple[tuple[int, ...], ...]:
        n = self.split.q_per_rank
        return tuple(tuple(range(r * n, (r + 1) * n)) for r in range(self.split.size))

    def agree(self, q, k, mask: AttentionMask) -> None:
        """Raise on every rank if the ranks differ in shapes or options."""
        if self.group is not None:
            meta = agreement(q, k, self.layout.seq_len, mask)
            GroupRing(self.group).start_agreement([v for _, v in meta], [w for w, _ in meta],
                                                  q.device)()  # fmt: skip

    def heads(self, x: torch.Tensor, kv: bool = False) -> torch.Tensor:
        return to_heads(x, self.split.kv_heads_of if kv else self.q_heads, self.layout, self.group)

    def tokens(self, y: torch.Tensor, kv: bool = False) -> torch.Tensor:
        split = self.split
        heads_of, heads = (split.kv_heads_of, split.kv_heads) if kv else (self.q_heads, split.heads)
        return from_heads(y, heads_of, heads, self.layout, self.group)

    def natural_mask(self, mask: AttentionMask) -> AttentionMask:
        """The mask over the whole sequence in natural order: the per-token facts of every rank
        (a per-key bias, of this rank's heads)."""
        facts = {}
        local = [t for t in (mask.document_ids, mask.key_padding_mask) if t is not None]
        if local:
            stacked = torch.stack([t.to(torch.int64) for t in local], 1)  # (B, n, S_local)
            every = (tuple(range(len(local))),) * self.split.size  # an all-gather
            gathered = to_heads(stacked, every, self.layout, self.group).unbind(1)
            if mask.document_ids is not None:
                facts["document_ids"] = gathered[0]
            if mask.key_padding_mask is not None:
                facts["key_padding_mask"] = gathered[-1].bool()
        if mask.key_bias is not None:
            bias = mask.key_bias.squeeze(2)  # (B|1, H|1, S_local)
            heads_of = self.q_heads if bias.shape[1] > 1 else ((0,),) * self.split.size
            facts["key_bias"] = to_heads(bias, heads_of, self.layout, self.group).unsqueeze(2)
        return AttentionMask(mask.rules, empty_rows_mean=mask.empty_rows_mean, **facts)

    def attention(self, q_h, mask: AttentionMask, kernels: str,
                  documents_source: torch.Tensor | None) -> RankCall:  # fmt: skip
        """The attention between the all-to-alls: a ring of one over the sequence in natural
        order. ``documents_source``: this rank's own document ids, whose identity keys the varlen
        segments every layer of a call and its backward share (the gathered ids are new each
        call of the op)."""
        call = RankCall.on(LocalRing(), q_h, mask, make_layout("contiguous", self.layout.seq_len, 1),
                           kernels)  # fmt: skip
        call.documents_source = documents_source
        return call


@torch.library.custom_op(
    "ringcompile::ulysses_attention",
    mutates_args=(),
    tags=NOT_CUDAGRAPHS,
    schema=f"(Tensor q, Tensor k, Tensor v, {OP_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def ulysses_attention_op(q, k, v, mask_tensors, mask_rules, scale, layout, seq_len, group_name,
                         kernels):  # fmt: skip
    """Ulysses attention on local shards; returns (out, and for the backward: q, k, v, out and
    lse of this rank's heads over the whole sequence). Use ``ringcompile.ring_attention(...,
    strategy="ulysses")``."""
    mask = AttentionMask.decode(mask_tensors, mask_rules)
    u = UlyssesCall.make(q.shape[1], k.shape[1], layout, seq_len, group_name)
    u.agree(q, k, mask)
    q_h, k_h, v_h = u.heads(q), u.heads(k, kv=True), u.heads(v, kv=True)
    call = u.attention(q_h, u.natural_mask(mask), kernels, mask.document_ids)
    out_h, lse_h = ring_forward(call, q_h, k_h, v_h, scale)
    return u.tokens(out_h), q_h, k_h, v_h, out_h, lse_h


@ulysses_attention_op.register_fake
def _(q, k, v, mask_tensors, mask_rules, scale, layout, seq_len, group_name, kernels):
    pg = resolve_group_name(group_name)
    split = HeadSplit.of(q.shape[1], k.shape[1], pg.size() if pg is not None else 1)
    B, D, Dv = q.shape[0], q.shape[3], v.shape[3]
    h, hkv = split.q_per_rank, split.kv_per_rank
    return (q.new_empty(q.shape), q.new_empty((B, h, seq_len, D)),
            k.new_empty((B, hkv, seq_len, D)), v.new_empty((B, hkv, seq_len, Dv)),
            q.new_empty((B, h, seq_len, Dv)),
            q.new_empty((B, h, seq_len), dtype=accumulation_dtype(q.dtype)))  # fmt: skip


@torch.library.custom_op(
    "ringcompile::ulysses_attention_backward", mutates_args=(), tags=NOT_CUDAGRAPHS,
    schema=f"(Tensor dout, Tensor q_h, Tensor k_h, Tensor v_h, Tensor out_h, Tensor lse_h, "
    f"int heads, int kv_heads, {OP_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def ulysses_attention_backward_op(dout, q_h, k_h, v_h, out_h, lse_h, heads, kv_heads,
                                  mask_tensors, mask_rules, scale, layout, seq_len, group_name,
                                  kernels):  # fmt: skip
    mask = AttentionMask.decode(mask_tensors, mask_rules)
    u = UlyssesCall.make(heads, kv_heads, layout, seq_len, group_name)
    dout_h = u.heads(dout.contiguous())
    call = u.attention(q_h, u.natural_mask(mask), kernels, mask.document_ids)
    dq_h, dk_h, dv_h = ring_backward(call, dout_h, q_h, k_h, v_h, out_h, lse_h, scale)
    return u.tokens(dq_h), u.tokens(dk_h, kv=True), u.tokens(dv_h, kv=True)


@ulysses_attention_backward_op.register_fake
def _(dout, q_h, k_h, v_h, out_h, lse_h, heads, kv_heads, mask_tensors, mask_rules, scale, layout,
      seq_len, group_name, kernels):  # fmt: skip
    B, S = dout.shape[0], dout.shape[2]
    return (dout.new_empty((B, heads, S, q_h.shape[3])), dout.new_empty((B, kv_heads, S, k_h.shape[3])),
            dout.new_empty((B, kv_heads, S, v_h.shape[3])))  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, mask_tensors, *options = inputs
    _, q_h, k_h, v_h, out_h, lse_h = output
    ctx.save_for_backward(q_h, k_h, v_h, out_h, lse_h, *mask_tensors)
    ctx.mark_non_differentiable(q_h, k_h, v_h, out_h, lse_h)
    ctx.heads, ctx.kv_heads = q.shape[1], k.shape[1]
    ctx.options = options
    ctx.num_inputs = len(inputs)


def _backward(ctx, dout, *unused):
    q_h, k_h, v_h, out_h, lse_h, *mask_tensors = ctx.saved_tensors
    dq, dk, dv = ulysses_attention_backward_op(dout, q_h, k_h, v_h, out_h, lse_h, ctx.heads,
                                               ctx.kv_heads, mask_tensors, *ctx.options)  # fmt: skip
    # the mask and options get no gradient (a per-key bias is treated as a constant)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


ulysses_attention_op.register_autograd(_backward, setup_context=_setup_context)
