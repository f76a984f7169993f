"""Pass 4: which nodes compute on this rank's tokens, and where full tensors enter that region.

Expects: ``ctx.sites`` (passes 1–3). Changes nothing in the graph.
Guarantees: ``ctx.demand[node] = dim`` for every node that will compute on local tokens (its
output's sequence dim), found by walking back from each site's q, k, v (dim -2) and attention
mask rows through ops that carry the sequence dim through (``dims.dim_map``);
``ctx.shard_points[node] = dim`` where that walk stops: a graph input, a buffer, a created tensor
(``arange``), a table sliced to the length, or an op that mixes along the sequence. A shard point
is computed full, as before, and sharded where it is used locally — so stopping early is always
exact, and walking further only saves work.

    tokens -> embedding -> rms_norm -> linear -> view -> transpose -> q -> sdpa
    demand: embedding (1), rms_norm (1), linear (1), view (1), transpose (2), sdpa (2)
    shard points: tokens (1)
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import dim_map, shape_of


def _kind(node: Node, dim: int, seq_len: int) -> str:
    """What a shard point holds, for the report and for ``fix_positions``."""
    if node.op == "placeholder":
        name = node.name.lower()
        return "positions" if "position" in name or "cache_pos" in name else "input"
    if node.op == "call_function" and node.target is operator.getitem:
        src = shape_of(node.args[0])
        if src is not None and dim < len(src) and src[dim] != seq_len:
            return "table"  # e.g. cos_cached[:S]: a precomputed per-position table
    # created from an arange somewhere upstream: positions
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is torch.arange:
            return "positions"
        stack.extend(n.all_input_nodes)
    return "value"


def run(ctx: RingContext) -> None:
    S = ctx.seq_len
    work: list[tuple[Node, int]] = []
    for site in ctx.sites:
        ctx.demand[site.node] = len(shape_of(site.node)) - 2
        for x in (site.q, site.k, site.v):
            work.append((x, len(shape_of(x)) - 2))
        if site.attn_mask is not None:
            ms = shape_of(site.attn_mask)
            if ms[-2] == S:  # mask rows are the queries: shard them; columns stay global
                work.append((site.attn_mask, len(ms) - 2))
        if site.facts is not None:
            work += [(t, 1) for t in site.facts.tensors().values()]  # (B, S) per-token facts

    while work:
        node, dim = work.pop()
        if node in ctx.demand or node in ctx.shard_points:
            have = ctx.demand.get(node, ctx.shard_points.get(node))
            if have != dim:
                # needed along two dims: compute it full and shard each use
                ctx.demand.pop(node, None)
                ctx.shard_points[node] = have
            continue
        mapping = dim_map(node)
        inputs = []
        if mapping is not None:
            for inp, m in mapping:
                s = shape_of(inp)
                inputs += [(inp, d) for d, o in m.items() if o == dim and s[d] == S]
        if not inputs:
            ctx.shard_points[node] = dim
            continue
        ctx.demand[node] = dim
        work.extend(inputs)

    for node, dim in ctx.shard_points.items():
        ctx.shard_kinds[node] = _kind(node, dim, S)
