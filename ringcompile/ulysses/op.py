"""Ulysses as ``torch.library`` ops: ``ringcompile::ulysses_attention`` and its backward, one op
each with its own autograd, so every rank issues the same all-to-alls in the same order whatever
the compiler does around them.

Forward: the ranks agree on shapes and options (one small all-gather: a mismatch raises on every
rank instead of pairing unequal all-to-alls), q, k and v go to heads, the facts are gathered, a
ring of one attends over the whole sequence in natural order, and the output comes back. The op
also returns what the backward needs in the heads' form (q, k, v, out, lse), so the backward sends
only dout there and dq, dk, dv back. The options and the mask's encoding are the ring op's.

Two levels are the same op with a ring between the all-to-alls: the all-to-all runs inside a head
group, whose ranks together hold one ring rank's tokens (``SplitLayout``), and the group's heads
attend on a ring of such groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringcompile.group import resolve_group_name
from ringcompile.kernels import accumulation_dtype
from ringcompile.layout import Layout, SplitLayout, make_layout
from ringcompile.masks import AttentionMask
from ringcompile.ring.backward import ring_backward
from ringcompile.ring.call import RankCall
from ringcompile.ring.comm import GroupRing, LocalRing, Ring
from ringcompile.ring.forward import agreement, ring_forward
from ringcompile.ring.op import NOT_CUDAGRAPHS, OP_OPTIONS
from ringcompile.ulysses.exchange import from_heads, to_heads
from ringcompile.ulysses.heads import HeadSplit

__all__ = ["ulysses_attention_op", "ulysses_attention_backward_op"]

# After the ring op's options: the group of the all-to-all over heads (for Ulysses alone, the
# call's group) and the ring between such groups ("": none, Ulysses alone; two levels otherwise).
GROUPS = "str heads_group, str ring_group"


@dataclass(frozen=True)
class UlyssesCall:
    """One rank's part of one Ulysses call: every rank of the call (``whole``), the group of the
    all-to-all over heads, the ring between such groups (a ring of one: Ulysses alone), the layout
    of the tokens over ``whole`` and the heads."""

    whole: dist.ProcessGroup | None
    heads_group: dist.ProcessGroup | None
    ring: Ring
    layout: Layout
    split: HeadSplit

    @classmethod
    def make(cls, heads: int, kv_heads: int, layout_name: str, seq_len: int, group_name: str,
             heads_group: str, ring_group: str) -> UlyssesCall:  # fmt: skip
        whole, group = resolve_group_name(group_name), resolve_group_name(heads_group)
        ring = resolve_group_name(ring_group)
        layout = make_layout(layout_name, seq_len, whole.size() if whole is not None else 1)
        if ring is not None and not isinstance(layout, SplitLayout):
            raise ValueError(f"two levels need a layout split over each head group, not {layout!r}")
        return cls(whole, group, GroupRing(ring) if ring is not None else LocalRing(), layout,
                   HeadSplit.of(heads, kv_heads, group.size() if group is not None else 1))  # fmt: skip

    @property
    def two_levels(self) -> bool:
        return isinstance(self.ring, GroupRing)

    @property
    def ring_layout(self) -> Layout:
        """The layout the attention between the all-to-alls sees: the split layout's ring (two
        levels), else the whole sequence in natural order on a ring of one."""
        if self.two_levels:
            return self.layout.inner
        return make_layout("contiguous", self.layout.seq_len, 1)

    @property
    def natural(self) -> Layout | None:
        """The layout whose tokens the all-to-alls put into natural order (Ulysses alone); two
        levels keep them as they arrive, one ring rank's tokens in its layout."""
        return None if self.two_levels else self.layout

    @property
    def q_heads(self) -> tuple[tuple[int, ...], ...]:
        n = self.split.q_per_rank
        return tuple(tuple(range(r * n, (r + 1) * n)) for r in range(self.split.size))

    def agree(self, q, k, mask: AttentionMask) -> None:
        """Raise on every rank of the call if the ranks differ in shapes or options."""
        if self.whole is not None:
            meta = agreement(q, k, self.layout.seq_len, mask)
            GroupRing(self.whole).start_agreement([v for _, v in meta], [w for w, _ in meta],
                                                  q.device)()  # fmt: skip

    def heads(self, x: torch.Tensor, kv: bool = False) -> torch.Tensor:
        heads_of = self.split.kv_heads_of if kv else self.q_heads
        return to_heads(x, heads_of, self.natural, self.heads_group)

    def tokens(self, y: torch.Tensor, kv: bool = False) -> torch.Tensor:
        split = self.split
        heads_of, heads = (split.kv_heads_of, split.kv_heads) if kv else (self.q_heads, split.heads)
        return from_heads(y, heads_of, heads, self.natural, self.heads_group)

    def heads_mask(self, mask: AttentionMask) -> AttentionMask:
        """The mask over the tokens between the all-to-alls: the per-token facts of every rank of
        the head group (a per-key bias, of this rank's heads)."""
        facts = {}
        local = [t for t in (mask.document_ids, mask.key_padding_mask) if t is not None]
        if local:
            stacked = torch.stack([t.to(torch.int64) for t in local], 1)  # (B, n, S_local)
            every = (tuple(range(len(local))),) * self.split.size  # an all-gather
            gathered = to_heads(stacked, every, self.natural, self.heads_group).unbind(1)
            if mask.document_ids is not None:
                facts["document_ids"] = gathered[0]
            if mask.key_padding_mask is not None:
                facts["key_padding_mask"] = gathered[-1].bool()
        if mask.key_bias is not None:
            bias = mask.key_bias.squeeze(2)  # (B|1, H|1, S_local)
            heads_of = self.q_heads if bias.shape[1] > 1 else ((0,),) * self.split.size
            facts["key_bias"] = to_heads(bias, heads_of, self.natural,
                                         self.heads_group).unsqueeze(2)  # fmt: skip
        return AttentionMask(mask.rules, empty_rows_mean=mask.empty_rows_mean, softcap=mask.softcap,
                             **facts)  # fmt: skip

    def attention(self, q_h, mask: AttentionMask, kernels: str,
                  documents_source: torch.Tensor | None) -> RankCall:  # fmt: skip
        """The attention between the all-to-alls: a ring of one over the sequence in natural
        order, or the ring of head groups over the split layout's ring. ``documents_source``:
        this rank's own document ids, whose identity keys the varlen segments every layer of a
        call and its backward share (the gathered ids are new each call of the op)."""
        call = RankCall.on(self.ring, q_h, mask, self.ring_layout, kernels)
        call.documents_source = documents_source
        return call


@torch.library.custom_op(
    "ringcompile::ulysses_attention",
    mutates_args=(),
    tags=NOT_CUDAGRAPHS,
    schema=f"(Tensor q, Tensor k, Tensor v, {OP_OPTIONS}, {GROUPS}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def ulysses_attention_op(q, k, v, mask_tensors, mask_rules, mask_softcap, scale, layout, seq_len, group_name,
                         kernels, heads_group, ring_group):  # fmt: skip
    """Ulysses attention on local shards; returns (out, and for the backward: q, k, v, out and
    lse of this rank's heads over the tokens between the all-to-alls). Use
    ``ringcompile.ring_attention(..., strategy="ulysses" or "two-level")``."""
    mask = AttentionMask.decode(mask_tensors, mask_rules, mask_softcap)
    u = UlyssesCall.make(q.shape[1], k.shape[1], layout, seq_len, group_name, heads_group,
                         ring_group)  # fmt: skip
    u.agree(q, k, mask)
    q_h, k_h, v_h = u.heads(q), u.heads(k, kv=True), u.heads(v, kv=True)
    call = u.attention(q_h, u.heads_mask(mask), kernels, mask.document_ids)
    out_h, lse_h = ring_forward(call, q_h, k_h, v_h, scale)
    return u.tokens(out_h), q_h, k_h, v_h, out_h, lse_h


@ulysses_attention_op.register_fake
def _(q, k, v, mask_tensors, mask_rules, mask_softcap, scale, layout, seq_len, group_name, kernels, heads_group,
      ring_group):  # fmt: skip
    u = UlyssesCall.make(q.shape[1], k.shape[1], layout, seq_len, group_name, heads_group,
                         ring_group)  # fmt: skip
    n = u.ring_layout.local_len
    B, D, Dv = q.shape[0], q.shape[3], v.shape[3]
    h, hkv = u.split.q_per_rank, u.split.kv_per_rank
    return (q.new_empty(q.shape), q.new_empty((B, h, n, D)), k.new_empty((B, hkv, n, D)),
            v.new_empty((B, hkv, n, Dv)), q.new_empty((B, h, n, Dv)),
            q.new_empty((B, h, n), dtype=accumulation_dtype(q.dtype)))  # fmt: skip


@torch.library.custom_op(
    "ringcompile::ulysses_attention_backward", mutates_args=(), tags=NOT_CUDAGRAPHS,
    schema=f"(Tensor dout, Tensor q_h, Tensor k_h, Tensor v_h, Tensor out_h, Tensor lse_h, "
    f"int heads, int kv_heads, {OP_OPTIONS}, {GROUPS}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def ulysses_attention_backward_op(dout, q_h, k_h, v_h, out_h, lse_h, heads, kv_heads,
                                  mask_tensors, mask_rules, mask_softcap, scale, layout, seq_len, group_name,
                                  kernels, heads_group, ring_group):  # fmt: skip
    mask = AttentionMask.decode(mask_tensors, mask_rules, mask_softcap)
    u = UlyssesCall.make(heads, kv_heads, layout, seq_len, group_name, heads_group, ring_group)
    dout_h = u.heads(dout.contiguous())
    call = u.attention(q_h, u.heads_mask(mask), kernels, mask.document_ids)
    dq_h, dk_h, dv_h = ring_backward(call, dout_h, q_h, k_h, v_h, out_h, lse_h, scale)
    return u.tokens(dq_h), u.tokens(dk_h, kv=True), u.tokens(dv_h, kv=True)


@ulysses_attention_backward_op.register_fake
def _(dout, q_h, k_h, v_h, out_h, lse_h, heads, kv_heads, mask_tensors, mask_rules, mask_softcap, scale, layout,
      seq_len, group_name, kernels, heads_group, ring_group):  # fmt: skip
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
