"""Pass 4: dense attention masks built from indices become per-token facts.

Expects: ``ctx.sites`` (pass 2).
Guarantees: a site whose ``attn_mask`` is computed, node by node, from index aranges, a key
padding mask and packed-document ids — the way transformers builds causal, sliding-window,
padding and packed-sequence masks — gets ``site.lifted_mask`` (an ``AttentionMask``: position
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

from dataclasses import replace

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import shape_of
from ringcompile.passes.fx_utils import source_line
from ringcompile.passes.mask_reader import NotLiftable, one_document, read_mask


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
        ctx.report.lifted.append(f"{where}: mask {mask_name} -> " + ", ".join(parts))
