"""Pass 6: dense attention masks built from indices become per-token facts.

Expects: ``ctx.sites`` (pass 4).
Guarantees: a site whose ``attn_mask`` is computed, node by node, from index aranges, a key
padding mask and packed-document ids — the way transformers builds causal, sliding-window,
padding and packed-sequence masks, and ALiBi's float mask with its bias per key — gets
``site.lifted_mask`` (an ``AttentionMask``: position
rules, key padding, document ids) and no dense mask: no rank materialises S x S, and the ring
skips steps and tiles the facts rule out. The mask is read symbolically (``mask_reader``: what
is understood), so the result is the same function, not a guess; anything else keeps the dense
mask (this rank's rows over all keys: exact) and the report says why.

Masks cross graph breaks as facts: a mask an earlier graph left as facts (``ctx.arriving_masks``)
reads as what it computes, and, where outputs leave lazily (``gather_outputs="lazy"``, several
ranks), a mask output that reads back leaves as its facts (``ctx.masks_leaving``): the graph returns
an empty anchor in its place and the facts after its own outputs, and the backend hands the next
graph a ``MaskAsFacts``. The S x S mask is then never computed.

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
from ringcompile.passes.fx_utils import sdpa_args, source_line
from ringcompile.passes.mask_reader import ChunkIds, NotLiftable, one_document, read_mask
from ringcompile.sequence_shard import MaskLeaving


def run(ctx: RingContext) -> None:
    for site in ctx.sites:
        if site.attn_mask is None:
            continue
        where = f"{site.node.name} at {source_line(site.node)}"
        try:
            facts = read_mask(site.attn_mask, shape_of(site.q)[0], ctx.seq_len,
                              known=ctx.arriving_masks, derived=ctx.derived_documents)  # fmt: skip
        except NotLiftable as why:
            ctx.report.fallbacks.append(
                f"{where}: dense mask kept (this rank's rows over all keys): {why}"
            )
            continue
        capped = "softcap" in sdpa_args(site.node)
        if capped and facts.empty_rows_mean and _no_row_empty(facts):
            facts = replace(facts, empty_rows_mean=False)
        if capped and facts.empty_rows_mean:
            ctx.report.fallbacks.append(
                f"{where}: dense mask kept (this rank's rows over all keys): rows it hides "
                "everywhere average every value, whose gradients through a soft cap the per-token "
                "facts do not give"
            )
            continue
        mask_name = site.attn_mask.name
        if site.attn_mask in ctx.arriving_masks:
            mask_name += " (facts from an earlier graph)"
        shifted = isinstance(facts.document_ids, ChunkIds)
        if shifted:
            facts = replace(facts, document_ids=_chunk_ids(ctx, site.node, facts.document_ids))
        single = facts.document_ids is not None and one_document(facts.document_ids)
        if single:
            facts = replace(facts, document_ids=None)
        site.lifted_mask, site.attn_mask = facts, None
        parts = [str(facts.rules)]
        parts += [f"{k}={n.name}" for k, n in facts.token_facts.items()]
        if single:
            parts.append("one document (ids computed from aranges)")
        if shifted:
            parts.append("the documents are chunks that start after each row's left padding")
        if facts.empty_rows_mean:
            parts.append("rows no key reaches get the mean of V (the float mask's finfo.min fill)")
        ctx.report.lifted.append(f"{where}: mask {mask_name} -> " + ", ".join(parts))
    _masks_leave_as_facts(ctx)


def _no_row_empty(facts) -> bool:
    """Whether every query sees a key: its own, where no key is padding and the position rules
    let a token see itself."""
    if facts.key_padding_mask is not None:
        return False
    here = torch.zeros(1, dtype=torch.int64)
    return bool(facts.rules.allows(here, here, 1).all())


def _masks_leave_as_facts(ctx: RingContext) -> None:
    """Mask outputs that read back as facts leave as them (see the module)."""
    if ctx.world_size == 1 or ctx.gather_outputs != "lazy":
        return
    graph = ctx.gm.graph
    output = graph.find_nodes(op="output")[0]
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else None
    if leaves is None:
        return
    own, extra = len(leaves), []
    for i, node in enumerate(leaves):
        shape = shape_of(node) if isinstance(node, Node) else None
        if shape is None or len(shape) != 4 or shape[2] != shape[3]:
            continue
        value = example(node)
        if not (value.dtype == torch.bool or value.is_floating_point()):
            continue
        try:
            facts = read_mask(node, shape[0], shape[2], known=ctx.arriving_masks,
                              derived=ctx.derived_documents)  # fmt: skip
        except NotLiftable:
            continue
        if isinstance(facts.document_ids, ChunkIds):
            continue  # (computed per site; not worth a second path)
        if facts.document_ids is not None and one_document(facts.document_ids):
            facts = replace(facts, document_ids=None)
        with graph.inserting_before(output):
            anchor = graph.call_function(torch.empty, (0,), {"device": value.device})
        anchor.meta["example_value"] = value.new_empty(0)
        leaves[i] = anchor
        names = tuple(facts.token_facts)
        at = tuple(range(own + len(extra), own + len(extra) + len(names)))
        extra += [facts.token_facts[n] for n in names]
        ctx.masks_leaving[i] = MaskLeaving(
            tuple(shape), value.dtype, facts.rules, facts.empty_rows_mean, names, at
        )
        what = ", ".join([str(facts.rules), *names])
        ctx.report.left.append(f"{node.name}: a mask, as per-token facts ({what}), never S x S")
    if ctx.masks_leaving:
        ctx.own_outputs = own
        output.args = (tuple(leaves + extra),)


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
