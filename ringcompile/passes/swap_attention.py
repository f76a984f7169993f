"""Pass 5: each sharded SDPA becomes the ring attention op.

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
from ringcompile.passes.find_attention import source_line


def run(ctx: RingContext) -> None:
    for site in ctx.sites:
        node = site.node
        where = f"{node.name} at {source_line(node)}"
        if node not in ctx.local_only:
            ctx.report.fallbacks.append(f"{where}: its queries are not sharded; left as plain SDPA")
            continue
        node.target = ctx.ring_attention()
        mask = "dense mask (local rows x global keys)" if site.attn_mask is not None else "no mask"
        ctx.report.attention.append(
            f"{where}: is_causal={site.is_causal}, {mask}"
        )
