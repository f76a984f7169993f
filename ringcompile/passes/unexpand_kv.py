"""Pass 5: K/V expanded for grouped-query attention go back to their KV heads.

Expects: ``ctx.sites`` (pass 4).
Guarantees: a site whose k and v are ``repeat_kv``-style expansions of (B, Hkv, S, D) tensors —
``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)``, as transformers writes it —
reads the unexpanded tensors with ``enable_gqa=True``. That is the same attention (query head i
reads KV head ``i // n`` either way), and only the Hkv heads travel around the ring. The
expansion itself is left for dead-code elimination.

    key = k[:, :, None].expand(2, 2, 4, S, 8).reshape(2, 8, S, 8); sdpa(q, key, value, ...)
    -> sdpa(q, k, v, ..., enable_gqa=True)
"""

from __future__ import annotations

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import shape_of
from ringcompile.passes.fx_utils import source_line
from ringcompile.passes.idioms import unexpanded


def run(ctx: RingContext) -> None:
    for site in ctx.sites:
        k, v = unexpanded(site.k), unexpanded(site.v)
        if k is None or v is None or k[1] != v[1]:
            continue
        node = site.node
        site.k, site.v = k[0], v[0]
        args = list(node.args)
        kwargs = dict(node.kwargs)
        for i, name, new in ((1, "key", site.k), (2, "value", site.v)):
            if len(args) > i:
                args[i] = new
            else:
                kwargs[name] = new
        kwargs["enable_gqa"] = True
        node.args, node.kwargs = tuple(args), kwargs
        ctx.report.lifted.append(
            f"{node.name} at {source_line(node)}: K/V expanded {k[1]}x by repeat_kv; "
            f"{shape_of(site.k)[1]} KV heads travel"
        )
