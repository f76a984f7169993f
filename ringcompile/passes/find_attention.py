"""Pass 4: find the SDPA calls that become ring attention, and the sequence they attend over.

Expects: a Dynamo FX graph in one spelling (pass 1) with static shapes (``example_value`` on
every node; the backend hands graphs with symbolic sizes to ``specialize.PerShape``, which makes
them static first).
Guarantees: ``ctx.sites`` lists each self-attention SDPA over the graph's sequence (queries and
keys of one length ``ctx.seq_len``, no dropout); every other SDPA is reported as a fallback and
left as it is (exact: it sees full tensors). A graph without SDPA reports each softmax over
(S, S) scores it has as a fallback: attention written by hand that pass 2 could not take, which
nothing shards.
An input an earlier graph left sharded (``ctx.arriving``) is ``ctx.arrived`` (taken as this rank's
tokens) where its layout is the graph's; a graph with no site takes its sequence from such inputs.
The others arrive gathered.

    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # q, k: (B, H, 4096, D)
    -> site(q, k, v, is_causal=True), seq_len = 4096
"""

from __future__ import annotations

from collections import Counter

from ringcompile.passes.context import AttentionSite, RingContext
from ringcompile.passes.dims import shape_of
from ringcompile.passes.fx_utils import is_sdpa, sdpa_args, source_line


def _is_attention_softmax(node) -> bool:
    """A softmax over scores of queries against keys of one sequence, (..., S, S): attention
    the passes did not take (a router's softmax over experts is none)."""
    if not (node.op in ("call_function", "call_method")
            and getattr(node.target, "__name__", node.target) == "softmax"):  # fmt: skip
        return False
    shape = shape_of(node)
    return shape is not None and len(shape) >= 3 and shape[-1] == shape[-2]


def run(ctx: RingContext) -> None:
    _find_sites(ctx)
    _settle_arrivals(ctx)


def _settle_arrivals(ctx: RingContext) -> None:
    for node, mask in ctx.arriving_masks.items():
        what = ", ".join([str(mask.rules), *mask.token_facts])
        ctx.report.arrived.append(f"{node.name}: a mask, as per-token facts ({what})")
    if not ctx.arriving:
        return
    if not ctx.seq_len:  # no attention: the sequence is the one the inputs carry
        lengths = Counter(layout.seq_len for _, layout in ctx.arriving.values())
        ctx.seq_len = ctx.report.seq_len = lengths.most_common(1)[0][0]
        ctx.report.layout = ctx.layout_name
    for node, (dim, layout) in ctx.arriving.items():
        if layout == ctx.layout:
            ctx.arrived[node] = dim
            ctx.report.arrived.append(f"{node.name} (dim {dim}): this rank's tokens")
        else:
            ctx.report.arrived.append(
                f"{node.name} (dim {dim}): sharded as {layout!r}, not as this graph's "
                f"{ctx.layout!r}: gathered as it enters"
            )


def _find_sites(ctx: RingContext) -> None:
    if not any(is_sdpa(n) for n in ctx.gm.graph.nodes):
        # a decode step's attention, already tree attention; or a piece of a model whose
        # attention is in other graphs (a router's softmax between graph breaks)
        if ctx.report.attention or ctx.arriving:
            return
        ctx.report.fallbacks += [
            f"{n.name} at {source_line(n)}: a softmax, and no F.scaled_dot_product_attention in "
            "this graph (attention written by hand?); nothing sharded — write the attention as "
            'F.scaled_dot_product_attention (transformers: attn_implementation="sdpa") to '
            "shard it"
            for n in ctx.gm.graph.nodes
            if _is_attention_softmax(n)
        ]
        return
    candidates = []
    for node in ctx.gm.graph.nodes:
        if not is_sdpa(node):
            continue
        a = sdpa_args(node)
        qs, ks = shape_of(a["query"]), shape_of(a["key"])
        where = f"{node.name} at {source_line(node)}"
        if qs[-2] != ks[-2]:
            ctx.report.fallbacks.append(
                f"{where}: {qs[-2]} queries over {ks[-2]} keys is not self-attention over one "
                "sequence (decoding with a cache?); left as plain SDPA"
            )
            continue
        if a.get("dropout_p", 0.0) not in (0, 0.0):
            ctx.report.fallbacks.append(
                f"{where}: dropout_p={a['dropout_p']} (the ring op has no dropout); left as plain "
                "SDPA on gathered tensors — set the model's attention dropout to 0 to shard it"
            )
            continue
        candidates.append((node, a, qs[-2]))
    if not candidates:
        return
    # one graph, one sequence: attention over another length stays unsharded
    ctx.seq_len = Counter(s for _, _, s in candidates).most_common(1)[0][0]
    for node, a, s in candidates:
        if s != ctx.seq_len:
            ctx.report.fallbacks.append(
                f"{node.name} at {source_line(node)}: attends over {s} tokens, not the graph's "
                f"sequence of {ctx.seq_len}; left as plain SDPA"
            )
            continue
        ctx.sites.append(
            AttentionSite(
                node=node,
                q=a["query"],
                k=a["key"],
                v=a["value"],
                attn_mask=a.get("attn_mask"),
                is_causal=bool(a.get("is_causal", False)),
                seq_len=s,
            )
        )
    ctx.report.seq_len = ctx.seq_len
    ctx.report.layout = ctx.layout_name
