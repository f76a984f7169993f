"""Pass 11: reductions over the sequence read local values: a partial per rank and one all-reduce.

Expects: the sharded region and its gathers (pass 10): a reduction over the sequence of a local
value reads ``ring_gather(x, dim)``.
Guarantees: such a reduction, when it is one of these, reads ``x`` itself instead, and the gather
goes unless something else needs it (a graph output):
- ``F.cross_entropy(logits, target, ignore_index=i, reduction="mean" | "sum")`` with logits' rows
  the sequence (N, C), or (B, S, C) logits flattened to rows (B·S, C), and a full target of as
  many rows — how transformers' causal-LM loss reads the logits after shifting its labels on the
  full tensor — becomes ``ring_cross_entropy``: the target is sharded where it meets the logits
  (padding rows get ``i``), each rank sums its rows' losses, the ring sums the partials, and a mean
  divides by the count of targets not ignored, read from the full target;
- ``sum`` or ``mean`` over all dims, or over the sequence dim alone, becomes ``ring_sum`` of the
  local value over its real tokens (divided by the full count for a mean); ``x.norm()`` (2-norm
  over all dims: a model that prints its hidden state's norm) the square root of ``ring_sum`` of
  its squares.
The result is a full value, the same on every rank; its gradient follows the ring's invariant.
The graph inputs a cross-entropy's target comes from (the labels) are ``ctx.loss_inputs``: each rank
reads its own rows of them, so every rank must be given them alike.

    logits = ring_gather(logits_local, 0); loss = cross_entropy(logits, labels, ignore_index=-100)
    -> loss = ring_cross_entropy(logits_local, labels, ignore_index=-100, reduction='mean')
"""

from __future__ import annotations

import inspect
import math
import operator

import torch.nn.functional as F
from torch.fx import Node

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import shape_of
from ringcompile.passes.fx_utils import inputs_behind, source_line

_CROSS_ENTROPY = inspect.signature(F.cross_entropy)


def _bind(node: Node) -> dict | None:
    try:
        bound = _CROSS_ENTROPY.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _cross_entropy(ctx: RingContext, node: Node, local: Node, dim: int, batch: int = 1
                   ) -> str | None:  # fmt: skip
    """``batch``: the logits' rows are (batch, sequence) flattened, the sequence inner."""
    a = _bind(node)
    target = a and a["target"]
    if not (
        isinstance(target, Node)
        and target not in ctx.local_only
        and dim == 0
        and len(shape_of(local)) == 2
        and shape_of(target) == (batch * ctx.seq_len,)
        and a["weight"] is None
        and a["size_average"] is None
        and a["reduce"] is None
        and a["label_smoothing"] == 0.0
        and a["reduction"] in ("mean", "sum")
    ):
        return None
    node.target = ctx.ring_cross_entropy()
    node.args = (local, target)
    _compare_inputs_behind(ctx, target)
    kwargs = {"ignore_index": a["ignore_index"], "reduction": a["reduction"]}
    node.kwargs = kwargs | ({"batch": batch} if batch > 1 else {})
    return f"cross_entropy ({a['reduction']})"


def _compare_inputs_behind(ctx: RingContext, node: Node) -> None:
    found = set(ctx.loss_inputs) | inputs_behind(node)
    ctx.loss_inputs = tuple(n for n in ctx.gm.graph.nodes if n in found)


def _flattened_rows(ctx: RingContext, view: Node, full: Node, local: Node, dim: int) -> None:
    """(B, S, C) logits flattened to rows (B·S, C) and read by cross-entropy losses only: the
    losses read the local logits flattened the same way."""
    shape = shape_of(full)
    if not (
        view.op == "call_method"
        and view.target in ("view", "reshape")
        and dim == 1
        and len(shape) == 3
        and shape_of(view) == (shape[0] * shape[1], shape[2])
        and view.users
        and all(u.op == "call_function" and u.target is F.cross_entropy for u in view.users)
    ):
        return
    with ctx.gm.graph.inserting_before(view):
        rows = ctx.gm.graph.call_method("reshape", (local, -1, shape[2]))
    rows.meta = dict(view.meta)  # full-shape meta, as every local node keeps
    for user in list(view.users):
        what = _cross_entropy(ctx, user, rows, 0, batch=shape[0])
        if what is not None:
            ctx.report.reductions.append(
                f"{user.name} ({what}) at {source_line(user)}: each rank's rows of {full.name} "
                f"(dim 1, flattened with the batch), summed over the ring"
            )
    if view.users:
        if not rows.users:
            ctx.gm.graph.erase_node(rows)
    else:
        ctx.gm.graph.erase_node(view)


def _norm(ctx: RingContext, node: Node, local: Node, dim: int) -> str | None:
    """``x.norm()`` or ``x.norm(2)`` over all dims."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 2)
    if set(node.kwargs) - {"p"} or len(node.args) > 2 or p not in (2, 2.0, "fro"):
        return None
    graph = node.graph
    squares = graph.call_function(operator.mul, (local, local))
    summed = graph.call_function(ctx.ring_sum(), (squares, dim, None, False))
    result = graph.call_method("sqrt", (summed,))
    result.meta = dict(node.meta)
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return "2-norm over all dims"


def _sum_or_mean(ctx: RingContext, node: Node, local: Node, dim: int, full_numel: int
                 ) -> str | None:  # fmt: skip
    if node.op == "call_method" and node.target == "norm":
        return _norm(ctx, node, local, dim)
    kind = node.target if node.op == "call_method" and node.target in ("sum", "mean") else None
    if kind is None:
        return None
    _, *rest = node.args
    rank = len(shape_of(local))
    over = rest[0] if rest else node.kwargs.get("dim")
    keepdim = rest[1] if len(rest) > 1 else node.kwargs.get("keepdim", False)
    if isinstance(over, (list, tuple)) and len(over) == 1:
        over = over[0]
    if set(node.kwargs) - {"dim", "keepdim"} or len(rest) > 2:
        return None  # a dtype, an out=: left as it is
    if over is not None and (not isinstance(over, int) or over % rank != dim):
        return None
    summed = node.graph.call_function(ctx.ring_sum(), (local, dim, over, keepdim))
    summed.meta = dict(node.meta)
    result = summed
    if kind == "mean":
        count = ctx.seq_len if over is not None else full_numel
        with node.graph.inserting_after(summed):
            result = node.graph.call_function(operator.truediv, (summed, count))
            result.meta = dict(node.meta)
    node.replace_all_uses_with(result)
    node.graph.erase_node(node)
    return f"{kind} over {'all dims' if over is None else f'dim {over}'}"


def run(ctx: RingContext) -> None:
    if not ctx.seq_len:
        return
    for gather, full in ctx.gathered.items():
        local, dim = gather.args  # ``full``'s example value has the full shape
        for user in list(gather.users):
            if user.op == "call_method" and user.target in ("view", "reshape"):
                _flattened_rows(ctx, user, full, local, dim)
                continue
            if user.op == "call_function" and user.target is F.cross_entropy:
                what = _cross_entropy(ctx, user, local, dim)
            else:
                with ctx.gm.graph.inserting_before(user):
                    what = _sum_or_mean(ctx, user, local, dim, math.prod(shape_of(full)))
            if what is None:
                continue
            ctx.report.reductions.append(
                f"{user.name} ({what}) at {source_line(user)}: each rank's rows of "
                f"{full.name} (dim {dim}), summed over the ring"
            )
        if not gather.users:
            # not a general dead-code pass: the sites' sharded mask facts have no user until
            # swap_attention
            ctx.gm.graph.erase_node(gather)
