"""The ring as ``torch.library`` ops: ``ringcompile::ring_attention`` and its backward, one op
each with its own autograd, so every rank issues the same sends and receives in the same order
whatever the compiler does around them.

The mask crosses this boundary encoded (``AttentionMask.encode``): its tensors, its rules, then
its soft cap.
"""

from __future__ import annotations

import torch

from ringcompile.kernels import accumulation_dtype
from ringcompile.masks import AttentionMask
from ringcompile.ring.backward import ring_backward
from ringcompile.ring.call import RankCall
from ringcompile.ring.forward import ring_forward

__all__ = ["NOT_CUDAGRAPHS", "OP_OPTIONS", "ring_attention_op", "ring_attention_backward_op"]

# Not for CUDA graphs: the ring waits on the host for its agreement check and issues its sends
# from Python. Tagged, inductor's "reduce-overhead" leaves them out of its graphs.
NOT_CUDAGRAPHS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


# The options both ops (and Ulysses' ops, ``ringcompile.ulysses.op``) take after their tensors;
# the mask crosses encoded (``AttentionMask.encode``): its tensors, its rules, its soft cap.
OP_OPTIONS = ("Tensor?[] mask_tensors, int[] mask_rules, float mask_softcap, float scale, str layout, int seq_len, "
              "str group_name, str kernels")  # fmt: skip


def _rank_call(q, mask_tensors, mask_rules, mask_softcap, scale, layout, seq_len, group_name,
               kernels) -> tuple[RankCall, float]:  # fmt: skip
    mask = AttentionMask.decode(mask_tensors, mask_rules, mask_softcap)
    return RankCall.make(q, mask, layout, seq_len, group_name, kernels), scale


@torch.library.custom_op(
    "ringcompile::ring_attention",
    mutates_args=(),
    tags=NOT_CUDAGRAPHS,
    schema=f"(Tensor q, Tensor k, Tensor v, {OP_OPTIONS}) -> (Tensor, Tensor)",
)
def ring_attention_op(q, k, v, *options) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention on local shards; returns (out, lse). Use ``ringcompile.ring_attention``."""
    call, scale = _rank_call(q, *options)
    return ring_forward(call, q, k, v, scale)


@ring_attention_op.register_fake
def _(q, k, v, *options):
    B, H, S, _ = q.shape
    # the output in q's layout (``forward.in_layout_of``)
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op(
    "ringcompile::ring_attention_backward", mutates_args=(), tags=NOT_CUDAGRAPHS,
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {OP_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def ring_attention_backward_op(dout, q, k, v, out, lse, *options):
    call, scale = _rank_call(q, *options)
    return ring_backward(call, dout, q, k, v, out, lse, scale)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, *options):
    # contiguous whatever the inputs' layouts: inductor checks this op's outputs against strides
    # it derives from inputs laid out as it lowered them, which need not be the layouts the op
    # runs with (gradients laid out as q failed those checks in test_inductor_matches_eager)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask_tensors, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *mask_tensors)
    ctx.options = options
    ctx.num_inputs = len(inputs)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *mask_tensors = ctx.saved_tensors
    dq, dk, dv = ring_attention_backward_op(dout, q, k, v, out, lse, mask_tensors, *ctx.options)
    # the mask and options get no gradient (an additive dense mask is treated as a constant)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
