"""Ulysses: attention over a sharded sequence by an all-to-all over heads.

Each rank holds its tokens of q, k and v for every head. An all-to-all gives each rank every token
of a group of heads (the sequence put back in natural order), one-GPU attention runs there on the
block engine's fastest kernel for the mask (plain on cuDNN, documents on a varlen kernel), and an
all-to-all brings the output back to the ranks' tokens. Nothing in between talks: no per-step
overhead, at the price of four all-to-alls (q, k, v, out; in the backward dout, dq, dk, dv) that
are not hidden.

Two levels (``strategy="two-level"`` over a (heads, ring) mesh) are the same op with a ring between
the all-to-alls: the all-to-all runs inside a head group whose ranks hold the pieces of one ring
rank's tokens (``ringcompile.layout.SplitLayout``), and the group's heads attend on the ring of
such groups.

The modules, in the order a call meets them:

- ``heads.py``: which query and KV heads each rank attends for (``HeadSplit``), and why a head
  count cannot be split;
- ``exchange.py``: the all-to-alls between the layout's tokens and a group of heads in natural
  order (or as they arrive: a ring rank's tokens, for two levels), and the per-token facts
  gathered the same way;
- ``op.py``: the ``ringcompile::ulysses_attention`` op and its backward, one op each with its own
  autograd; the attention between the all-to-alls is a ring of one, or of head groups
  (``ringcompile.ring``).
"""

from ringcompile.ulysses.heads import HeadSplit, split_refusal
from ringcompile.ulysses.op import ulysses_attention_backward_op, ulysses_attention_op

__all__ = ["HeadSplit", "split_refusal", "ulysses_attention_backward_op", "ulysses_attention_op"]
