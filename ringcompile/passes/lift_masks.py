"""Pass 5: dense attention masks built from indices become per-token facts.

Expects: ``ctx.sites`` (pass 3).
Guarantees: a site whose ``attn_mask`` is computed, node by node, from index aranges, a key
padding mask and packed-document ids — the way transformers builds causal, sliding-window,
padding and packed-sequence masks, and ALiBi's float mask with its bias per key — gets
``site.lifted_mask`` (an ``AttentionMask``: position
rules, key padding, document ids) and no dense mask: no rank materialises S x S, and the ring
skips steps and tiles the facts rule out. The mask is read symbolically (``mask_reader``: what
is understood), so the result is the same function, not a guess; anything else keeps the dense
mask (this rank's rows over all keys: exact) and the report says why.

Document ids computed from nothing but aranges (transformers derives them from position ids it
made itself with an arange: no packing) are evaluated at compile time; one document is no rule,
and the site keeps plain blocks the fused kernels compute.

    mask = (kv[None, None, None, :] <= q[None, None, :, None]) & am[b, kv]; sdpa(q, k, v, mask)
    -> lifted_mask: causal, key_padding_mask=am
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import replace

import torch
from torch.fx import Node

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import example, shape_of
from ringcompile.passes.fx_utils import source_line
from ringcompile.passes.mask_reader import ChunkIds, NotLiftable, one_document, read_mask


def run(ctx: RingContext) -> None:
    for site in ctx.sites:
        if site.attn_mask is None:
            continue
        where = f"{site.node.name} at {source_line(site.node)}"
        try:
            facts = read_mask(site.attn_mask, shape_of(site.q)[0], ctx.seq_len)
        except NotLiftable as why:
            ctx.report.fallbacks.append(
                f"{where}: dense mask kept (this rank's rows over all keys): {why}"
            )
            continue
        mask_name = site.attn_mask.name
        shifted = isinstance(facts.document_ids, ChunkIds)
        if shifted:
            facts = replace(facts, document_ids=_chunk_ids(ctx, site.node, facts.document_ids))
        single = facts.document_ids is not None and one_document(facts.document_ids)
        if single:
            facts = replace(facts, document_ids=None)
        site.lifted_mask, site.attn_mask = facts, None
        parts = ["causal" if facts.rules.causal else "bidirectional"]
        if facts.rules.window:
            parts.append(f"window {facts.rules.window}")
        if facts.rules.chunk:
            parts.append(f"chunks of {facts.rules.chunk}")
        parts += [f"{k}={n.name}" for k, n in facts.token_facts.items()]
        if single:
            parts.append("one document (ids computed from aranges)")
        if shifted:
            parts.append("the documents are chunks that start after each row's left padding")
        if facts.empty_rows_mean:
            parts.append("rows no key reaches get the mean of V (the float mask's finfo.min fill)")
        ctx.report.lifted.append(f"{where}: mask {mask_name} -> " + ", ".join(parts))


def _chunk_ids(ctx: RingContext, before: Node, ids: ChunkIds) -> Node:
    """The (B, S) document ids ``(P[b, t] - shift[b]) // size`` as nodes before ``before``."""
    graph, S = ctx.gm.graph, ctx.seq_len

    def add(op, target, args, value):
        node = getattr(graph, op)(target, args)
        node.meta["example_value"] = value
        return node

    shift = ids.shift
    with graph.inserting_before(before):
        column = add("call_method", "unsqueeze", (shift, 1), example(shift).unsqueeze(1))
        if ids.positions is None:
            device = example(shift).device
            positions = graph.call_function(torch.arange, (S,), {"device": device})
            # (under the graph's fake mode, as every example value is)
            with getattr(example(shift), "fake_mode", None) or contextlib.nullcontext():
                positions.meta["example_value"] = torch.arange(S, device=device)
        else:
            positions = ids.positions
        shifted = add("call_function", operator.sub, (positions, column),
                      example(positions) - example(column))  # fmt: skip
        return add("call_function", operator.floordiv, (shifted, ids.size),
                   example(shifted) // ids.size)  # fmt: skip
