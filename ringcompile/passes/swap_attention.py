"""Pass 7: each sharded SDPA becomes the ring attention op.

Expects: SDPA sites whose q, k, v (and mask rows) are local (pass 4).
Guarantees: every such call is ``ring_attention(q, k, v, ...)`` with SDPA's arguments carried over
(mask, causality, scale, GQA): the same rows SDPA would give for this rank's queries over the
global sequence. Causality is by global position, so any layout is exact. A dense mask arrives as
this rank's rows over all keys (its key side was never sharded), the ring op's dense fallback.

    out = torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    -> out = ring_attention(q, k, v, is_causal=True, enable_gqa=True)
"""

from __future__ import annotations

from ringcompile.passes.context import RingContext
from ringcompile.passes.find_attention import sdpa_args, source_line


def run(ctx: RingContext) -> None:
    for site in ctx.sites:
        node = site.node
        where = f"{node.name} at {source_line(node)}"
        if node not in ctx.local_only:
            ctx.report.fallbacks.append(f"{where}: its queries are not sharded; left as plain SDPA")
            continue
        node.target = ctx.ring_attention()
        if site.facts is not None:
            f = site.facts
            a = sdpa_args(node)
            node.args = (a.pop("query"), a.pop("key"), a.pop("value"))
            kwargs = {k: v for k, v in a.items() if k not in ("attn_mask", "is_causal")}
            kwargs.update(is_causal=f.is_causal, **ctx.site_facts_local[node])
            if f.window is not None:
                kwargs["window"] = f.window
            node.kwargs = kwargs
            mask = "per-token mask facts"
        elif site.attn_mask is not None:
            mask = "dense mask (local rows x global keys)"
        else:
            mask = "no mask"
        causal = site.facts.is_causal if site.facts is not None else site.is_causal
        ctx.report.attention.append(f"{where}: is_causal={causal}, {mask}")
    # what fed the dense masks and K/V expansions that were lifted is dead now
    ctx.remove_dead_code()
