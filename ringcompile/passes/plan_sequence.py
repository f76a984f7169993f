"""Pass 9: which nodes compute on this rank's tokens, and where full tensors enter that region.

Expects: ``ctx.sites`` (passes 4–7). Changes nothing in the graph.
Guarantees: ``ctx.plan``, a read-only ``SequencePlan``: ``demand[node] = dim`` for every node
that will compute on local tokens (its output's sequence dim), found by walking back from each site's q, k, v (dim -2) and attention
mask rows through ops that carry the sequence dim through (``dims.dim_map``);
``shard_points[node] = dim`` where that walk stops: a graph input, a buffer, a created tensor
(``arange``), a table sliced to the length, or an op that mixes along the sequence. A shard point
is computed full, as before, and sharded where it is used locally — so stopping early is always
exact, and walking further only saves work. A tensor made from its sizes alone
(``x.new_empty(B, H, S, D)``, ``dims.made_from_sizes``) is in ``demand``: made at the local length. ``shard_kinds[node]`` says what each holds: an
``input``, ``positions`` (its sequence dim comes from aranges or position inputs alone), a
``table`` sliced to the length, or a ``value`` (anything else, e.g. a KV cache concatenated along
it). An integer graph input is a position input by what it is used for, whatever its name: cast to
floating point and multiplied by a floating tensor (rotary frequencies), or indexing a table.
``sequence_inputs`` lists, in graph order, the graph inputs the shard points are computed from
(the tokens, position ids, an attention mask; not the model's parameters and buffers): what every
rank must be given alike, since each rank takes its tokens of what it computes from them.

    tokens -> embedding -> rms_norm -> linear -> view -> transpose -> q -> sdpa
    demand: embedding (1), rms_norm (1), linear (1), view (1), transpose (2), sdpa (2)
    shard points: tokens (1)
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ringcompile.passes.context import RingContext, SequencePlan
from ringcompile.passes.dims import dim_map, made_from_sizes, shape_of
from ringcompile.passes.fx_utils import inputs_behind

# ops that move an input's values without reading them as numbers
_SHAPE_METHODS = {
    "view",
    "reshape",
    "unsqueeze",
    "squeeze",
    "expand",
    "transpose",
    "permute",
    "contiguous",
    "flatten",
    "clone",
    "long",
    "int",
}
_FLOAT_CASTS = {"float", "double", "half", "bfloat16"}
_PRODUCTS = {operator.matmul, operator.mul, torch.outer, "outer"}


def _reaches(node: Node, found, through) -> bool:
    """Whether a user ``u`` of ``node`` (read as ``n``) has ``found(n, u)``, following users on
    through the ones with ``through(n, u)``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if found(n, u):
                return True
            if through(n, u):
                stack.append(u)
    return False


def _is_float_cast(u: Node) -> bool:
    return u.op == "call_method" and (u.target in _FLOAT_CASTS or (
        u.target in ("to", "type") and any(isinstance(a, torch.dtype) and a.is_floating_point
                                           for a in [*u.args[1:], *u.kwargs.values()])))  # fmt: skip


def _used_as_positions(node: Node) -> bool:
    """Whether an integer input's values are used as positions: cast to floating point and
    multiplied by another floating tensor (rotary frequencies; a mask's ``(1 - m.float()) * min``
    is scaled by a number), or indexing a per-position table (``cos_cached[position_ids]``),
    through reshapes; token ids go to an embedding, labels to a loss, a mask to comparisons."""

    def reshapes(n, u):
        return (u.op == "call_method" and u.target in _SHAPE_METHODS) or (
            u.op == "call_function" and u.target is operator.getitem and u.args[0] is n
        )

    def scaled(n, u):
        return u.op in ("call_function", "call_method") and u.target in _PRODUCTS and any(
            isinstance(a, Node) and a is not n and isinstance(a.meta.get("example_value"),
                                                              torch.Tensor)
            and a.meta["example_value"].is_floating_point() for a in u.args)  # fmt: skip

    def found(n, u):
        if _is_float_cast(u):
            return _reaches(u, scaled, lambda m, w: reshapes(m, w) or _is_float_cast(w))
        if not (u.op == "call_function" and u.target is operator.getitem) or u.args[0] is n:
            return False
        index = u.args[1]
        return n in (index if isinstance(index, tuple) else (index,))

    return _reaches(node, found, reshapes)


def _origin(node: Node, dim: int, seq_len: int) -> str | None:
    """What a tensor holds if its sequence dim starts at ``node``; None if it comes from inputs."""
    if node.op == "placeholder":
        value = node.meta.get("example_value")
        integer = isinstance(value, torch.Tensor) and not value.is_floating_point()
        return "positions" if integer and _used_as_positions(node) else "input"
    if node.op == "call_function" and node.target is torch.arange:
        return "positions"
    if node.op == "call_function" and node.target is operator.getitem:
        src = shape_of(node.args[0])
        if src is not None and dim < len(src) and src[dim] != seq_len:
            return "table"  # e.g. cos_cached[:S]: a precomputed per-position table
    return None


def _kind(node: Node, dim: int, seq_len: int) -> str:
    """What a shard point holds, for the report (``shard_sequence``): its own origin, else
    "positions" if its sequence dim comes from positions alone (rotary cos/sin of position ids),
    else "value" (token data, or a dim the rules do not follow back, such as a KV-cache ``cat``)."""
    own = _origin(node, dim, seq_len)
    if own is not None:
        return own
    seen, stack = set(), [(node, dim)]
    while stack:
        n, d = stack.pop()
        if (n, d) in seen:
            continue
        seen.add((n, d))
        origin = _origin(n, d, seq_len)
        if origin == "input":
            return "value"
        if origin is not None:
            continue
        mapping = dim_map(n) or []
        inputs = [
            (i, di)
            for i, m in mapping
            for di, o in m.items()
            if o == d and shape_of(i)[di] == seq_len
        ]
        if not inputs:
            return "value"
        stack.extend(inputs)
    return "positions"


def run(ctx: RingContext) -> None:
    S = ctx.seq_len
    demand: dict[Node, int] = {}
    shard_points: dict[Node, int] = {}
    work: list[tuple[Node, int]] = []
    for site in ctx.sites:
        demand[site.node] = len(shape_of(site.node)) - 2
        for x in (site.q, site.k, site.v):
            work.append((x, len(shape_of(x)) - 2))
        if site.attn_mask is not None:
            ms = shape_of(site.attn_mask)
            if ms[-2] == S:  # mask rows are the queries: shard them; columns stay global
                work.append((site.attn_mask, len(ms) - 2))
        if site.lifted_mask is not None:
            # per-token facts along their last dim, their tokens
            work += [(t, len(shape_of(t)) - 1) for t in site.lifted_mask.token_facts.values()]

    while work:
        node, dim = work.pop()
        if node in demand or node in shard_points:
            have = demand.get(node, shard_points.get(node))
            if have != dim:
                # needed along two dims: compute it full and shard each use
                demand.pop(node, None)
                shard_points[node] = have
            continue
        mapping = dim_map(node)
        inputs = []
        if mapping is not None:
            for inp, m in mapping:
                s = shape_of(inp)
                inputs += [(inp, d) for d, o in m.items() if o == dim and s[d] == S]
        if not inputs and not made_from_sizes(node):
            shard_points[node] = dim
            continue
        demand[node] = dim
        work.extend(inputs)

    kinds = {node: _kind(node, dim, S) for node, dim in shard_points.items()}
    behind = set().union(*(inputs_behind(node) for node in shard_points))
    ctx.plan = SequencePlan.of(
        demand, shard_points, kinds, [n for n in ctx.gm.graph.nodes if n in behind]
    )
