"""Pass 8: tokens flattened with the batch into rows are put back in (batch, sequence) form.

Expects: ``ctx.seq_len`` (pass 4).
Guarantees: where a model flattens ``x`` (B, S, ...) with B > 1 into rows (B·S, ...), computes
on the rows one row at a time and splits them back into (B, S, ...), the flatten is gone and the
ops in between run on (B, S, ...) directly (their example values follow), so the later passes find
the sequence dim there and the region runs on each rank's tokens. Row-by-row ops: pointwise ops,
``linear``, ``addmm`` (as ``bias + x @ w``), layer and RMS norms over trailing dims,
``softmax``/``log_softmax``/``dropout``/``topk``, reductions and ``scatter`` over a trailing dim,
reshapes that keep the shape, and outlined experts (pass 7), which then take (B, S) rows. Any
other use of the rows (indexing by data, a loss over the rows) leaves that flatten as it is:
exact, computed on the whole sequence. At B = 1 the passes follow the flatten already (a dim of
size 1 dropped).

    x (2, S, D) -> view(2S, D) -> addmm(b, ., w) -> view(2, S, N)        (GPT-2's Conv1D)
    -> x (2, S, D) -> add(b, matmul(x, w)) -> view(2, S, N)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import (
    LINEARS,
    NORMS,
    POINTWISE_FUNCTIONS,
    POINTWISE_METHODS,
    REDUCTIONS,
    SOFTMAXES,
    example,
    shape_of,
)
from ringcompile.passes.fx_utils import source_line
from ringcompile.passes.rowwise_region import rowwise_region_of

_FLATTENS = {"view", "reshape", "flatten"}
_SCATTERS = {"scatter", "scatter_"}
_SOFTMAX_LIKE = SOFTMAXES | {"softmax", "log_softmax"}


def _is_call(node: Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _merges_batch_and_sequence(node: Node, S: int) -> int | None:
    """B if ``node`` reshapes (B, S, ...) with B > 1 into (B·S, ...), else None."""
    if not _is_call(node, _FLATTENS) or not node.args:
        return None
    src, out = shape_of(node.args[0]), shape_of(node)
    if src is None or out is None or len(src) < 2 or src[1] != S or src[0] <= 1:
        return None
    return src[0] if out == (src[0] * S, *src[2:]) else None


def _splits_rows(node: Node, B: int, S: int) -> bool:
    """Whether ``node`` reshapes rows (B·S, ...) into (B, S, ...)."""
    if not _is_call(node, {"view", "reshape", "unflatten"}):
        return False
    src, out = shape_of(node.args[0]), shape_of(node)
    return src is not None and out == (B, S, *src[1:])


def _softmax_dim(node: Node):
    """The dim a softmax-like call normalises over."""
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def _along(node: Node):
    """The dim(s) a trailing-dim op works along (softmax, topk, a reduction, a scatter), or None."""
    if _is_call(node, _SCATTERS):
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if _is_call(node, {torch.topk}):
        return node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else -1)
    if _is_call(node, REDUCTIONS):
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return _softmax_dim(node)


def _trailing(dims) -> bool:
    """Whether ``dims`` (an int or several) leave the rows' dim 0 alone."""
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return all(isinstance(d, int) and d != 0 for d in dims) and bool(dims)


def _row_op(node: Node, rows: set[Node]) -> bool:
    """Whether ``node`` computes each row from that row alone (its other tensors have no rows)."""
    if _is_call(node, POINTWISE_FUNCTIONS | POINTWISE_METHODS):
        out = shape_of(node)
        others = [
            a
            for a in [*node.args, *node.kwargs.values()]
            if isinstance(a, Node) and shape_of(a) is not None and a not in rows
        ]
        # an operand without the rows dim broadcasts against them (a parameter, a scalar)
        return out is not None and all(len(shape_of(a)) < len(out) or shape_of(a)[0] == 1
                                       for a in others)  # fmt: skip
    if _is_call(node, LINEARS):
        return node.args[0] in rows and not any(a in rows for a in node.args[1:])
    if _is_call(node, {torch.addmm}):
        return (len(node.args) == 3 and not node.kwargs and node.args[1] in rows
                and node.args[0] not in rows and node.args[2] not in rows)  # fmt: skip
    if _is_call(node, NORMS):
        return node.args[0] in rows
    if _is_call(node, _SOFTMAX_LIKE):  # over a dim other than the rows'
        dim = _softmax_dim(node)
        return node.args[0] in rows and isinstance(dim, int) and dim != 0
    if _is_call(node, {F.dropout}):
        return node.args[0] in rows
    if _is_call(node, {torch.topk} | REDUCTIONS):  # along a dim other than the rows'
        return node.args[0] in rows and _trailing(_along(node))
    if _is_call(node, _SCATTERS):  # x.scatter(dim, index, src): rows of all three line up
        tensors = [a for a in (*node.args[2:], *node.kwargs.values()) if isinstance(a, Node)]
        return node.args[0] in rows and all(a in rows for a in tensors) and _trailing(_along(node))
    if node.op == "call_function" and node.target is operator.getitem:  # of a topk's pair
        return node.args[0] in rows and isinstance(example(node.args[0]), tuple)
    if _is_call(node, _FLATTENS) and shape_of(node) == shape_of(node.args[0]):
        return node.args[0] in rows  # keeps the shape: nothing to do
    region = rowwise_region_of(node)
    if region is not None:
        return all((a in rows) == (i in region.row_inputs) for i, a in enumerate(node.args))
    return False


def _region(flat: Node, B: int, S: int) -> tuple[list[Node], list[Node]] | None:
    """The row-by-row ops fed by ``flat`` (in graph order) and the splits that end them; None if
    the rows reach anything else."""
    position = {n: i for i, n in enumerate(flat.graph.nodes)}
    rows, order, exits = {flat}, [], []
    frontier = set(flat.users)
    while frontier:  # in graph order: a node's row inputs are judged before it
        u = min(frontier, key=position.__getitem__)
        frontier.remove(u)
        if _splits_rows(u, B, S):
            exits.append(u)
            continue
        if not _row_op(u, rows):
            return None
        rows.add(u)
        order.append(u)
        frontier |= set(u.users)
    return order, exits


def _shift_dims(node: Node) -> None:
    """The rows' dim d > 0 is dim d + 1 of (B, S, ...); negative dims stay."""
    dims = _along(node)
    shifted = (type(dims)(d + 1 if d > 0 else d for d in dims) if isinstance(dims, (tuple, list))
               else dims + 1 if dims > 0 else dims)  # fmt: skip
    at = 2 if _is_call(node, {torch.topk}) else 1  # (topk(x, k, dim); others (x, dim, ...))
    if "dim" in node.kwargs:
        node.kwargs = {**node.kwargs, "dim": shifted}
    else:
        node.args = (*node.args[:at], shifted, *node.args[at + 1 :])


def _unflatten(ctx: RingContext, flat: Node, B: int, ops: list[Node]) -> None:
    S = ctx.seq_len
    graph = ctx.gm.graph
    # (judged before the rows take their (B, S) form)
    same_shape = {n for n in ops if _is_call(n, _FLATTENS) and shape_of(n) == shape_of(n.args[0])}
    flat.replace_all_uses_with(flat.args[0])
    for node in ops:
        if node in same_shape:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        region = rowwise_region_of(node)
        if region is not None:
            region.lead = 2  # its rows come as (B, S)
        if _is_call(node, {torch.addmm}):
            bias, x, w = node.args
            with graph.inserting_before(node):
                product = graph.call_function(operator.matmul, (x, w))
                product.meta = dict(node.meta)
                product.meta["example_value"] = example(node).unflatten(0, (B, S))
                total = graph.call_function(operator.add, (bias, product))
                total.meta = dict(product.meta)
            node.replace_all_uses_with(total)
            graph.erase_node(node)
            continue
        if _is_call(node, _SOFTMAX_LIKE | {torch.topk} | REDUCTIONS | _SCATTERS):
            _shift_dims(node)
        value = example(node)
        node.meta["example_value"] = (
            tuple(v.unflatten(0, (B, S)) for v in value)
            if isinstance(value, tuple)
            else value.unflatten(0, (B, S))
        )
    graph.erase_node(flat)


def run(ctx: RingContext) -> None:
    if not ctx.seq_len:
        return
    S = ctx.seq_len
    for flat in list(ctx.gm.graph.nodes):
        B = _merges_batch_and_sequence(flat, S)
        if B is None:
            continue
        found = _region(flat, B, S)
        if found is None or not found[1]:
            continue
        ops, _ = found
        _unflatten(ctx, flat, B, ops)
        ctx.report.rows.append(
            f"{flat.name} (batch {B}): {len(ops)} row-by-row op(s) at {source_line(flat)}"
        )
