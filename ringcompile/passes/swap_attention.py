"""Pass 12: each sharded SDPA becomes the ring attention op.

Expects: SDPA sites whose q, k, v (and mask rows) are local (pass 9).
Guarantees: every such call is ``ring_attention(q, k, v, ...)`` with SDPA's arguments carried over
(mask, causality, scale, GQA): the same rows SDPA would give for this rank's queries over the
global sequence. Causality is by global position, so any layout is exact. A dense mask arrives as
this rank's rows over all keys (its key side was never sharded), the ring op's dense fallback.
Each site's strategy (``ringcompile.strategy``) is settled here; a Ulysses or two-level site says
so:

    out = torch._C._nn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    -> out = ring_attention(q, k, v, is_causal=True, enable_gqa=True)
    -> out = ring_attention(q, k, v, is_causal=True, document_ids=doc, strategy='ulysses')
"""

from __future__ import annotations

from dataclasses import replace

from torch.fx import Node

from ringcompile.kernels import plan_kernels, resolve_kernel_choice
from ringcompile.mask_mod import MaskWithBias
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import example
from ringcompile.passes.fx_utils import MASK_MOD, sdpa_args, source_line
from ringcompile.ring import describe_steps
from ringcompile.strategy import choose
from ringcompile.ulysses import HeadSplit
from ringcompile.ulysses.explain import describe_two_levels, describe_ulysses


def run(ctx: RingContext) -> None:
    for site in ctx.sites:
        node = site.node
        where = f"{node.name} at {source_line(node)}"
        if node not in ctx.local_only:
            ctx.report.fallbacks.append(f"{where}: its queries are not sharded; left as plain SDPA")
            continue
        node.target = ctx.ring_attention()
        softcap = float(sdpa_args(node).get("softcap") or 0.0)
        if site.lifted_mask is not None:
            rules = site.lifted_mask.rules
            a = sdpa_args(node)
            node.args = (a.pop("query"), a.pop("key"), a.pop("value"))
            kwargs = {k: v for k, v in a.items() if k not in ("attn_mask", "is_causal")}
            kwargs.update(is_causal=rules.causal, **site.local_facts)
            if rules.window is not None:
                kwargs["window"] = rules.window
            if rules.chunk:
                kwargs["chunk"] = rules.chunk
            if rules.prefix:
                kwargs["prefix"] = rules.prefix
            if site.lifted_mask.empty_rows_mean:
                kwargs["empty_rows"] = "mean"
            node.kwargs = kwargs
            mask = replace(site.lifted_mask, softcap=softcap)
            what = "per-token mask facts"
        elif (per_step := _mask_mod(ctx, site)) is not None:
            fn, buffers = per_step
            node.kwargs = {**{k: v for k, v in node.kwargs.items() if k != "attn_mask"},
                           "mask_mod": fn, "mask_buffers": list(buffers)}  # fmt: skip
            module = getattr(ctx.gm, fn.target)
            mask = AttentionMask(PositionRules(site.is_causal), softcap=softcap, mask_mod=module,
                                 mask_buffers=buffers)  # fmt: skip
            kind = (
                "mask_mod and score_mod's bias" if isinstance(module, MaskWithBias) else "mask_mod"
            )
            what = f"flex {kind} {fn.target} evaluated on each step's block"
            # (lift_masks said the dense mask stays: it does not)
            kept = f"{where}: dense mask kept (this rank's rows over all keys): "
            ctx.report.fallbacks = [
                f"{where}: mask not read as rules or facts ({f[len(kept) :]}); its mask_mod runs "
                "on each ring step's block instead"
                if f.startswith(kept)
                else f
                for f in ctx.report.fallbacks
            ]
        else:
            mask = AttentionMask(PositionRules(site.is_causal), dense=site.attn_mask,
                                 softcap=softcap)  # fmt: skip
            what = "no mask" if site.attn_mask is None else "dense mask (local rows x global keys)"
        if softcap:
            what += f", scores soft-capped at {softcap:g}"
        q, k = example(site.q), example(site.k)
        two = ctx.two_level
        choice = choose(ctx.strategy, q.shape[1], k.shape[1], ctx.world_size, mask,
                        two.heads.size() if two is not None else None)  # fmt: skip
        if choice.strategy != "ring":
            node.kwargs = {**node.kwargs, "strategy": choice.strategy}
        if choice.refused is not None:
            ctx.report.fallbacks.append(f"{where}: strategy={ctx.strategy!r} refused "
                                        f"({choice.refused}); it runs as a ring")  # fmt: skip
        ctx.report.attention.append(
            f"{where}: is_causal={mask.rules.causal}, {what}; {choice.strategy}: {choice.reason}"
        )
        _report_steps(ctx, node, site, mask, choice.strategy)
    # what fed the dense masks and K/V expansions that were lifted is dead now
    ctx.remove_dead_code()


def _mask_mod(ctx: RingContext, site) -> tuple[Node, tuple[Node, ...]] | None:
    """The (mask_mod, buffers) of a flex site whose mask stayed dense, when every buffer is a
    full tensor (the mask_mod indexes it by global position); None otherwise."""
    found = site.node.meta.get(MASK_MOD)
    if found is None or site.attn_mask is None or "attn_mask" not in site.node.kwargs:
        return None
    fn, buffers = found
    if any(b in ctx.local_only or b in ctx.arrived for b in buffers):
        return None
    return fn, buffers


def _report_steps(ctx: RingContext, node, site, mask: AttentionMask[Node], strategy: str) -> None:
    """This rank's ring steps for the site, or its Ulysses attention: each block's kind and
    kernel (once per kind of site)."""
    q, k = example(site.q), example(site.k)
    kernels = plan_kernels(q.device, q.dtype, q.shape[-1], resolve_kernel_choice(ctx.kernels))
    if strategy == "ulysses":
        title = "ulysses on this rank"
        split = HeadSplit.of(q.shape[1], k.shape[1], ctx.world_size)
        lines = describe_ulysses(ctx.seq_len, split, mask, kernels)
    elif strategy == "two-level":
        title = "two levels on this rank"
        split = HeadSplit.of(q.shape[1], k.shape[1], ctx.two_level.heads.size())
        lines = describe_two_levels(ctx.layout, ctx.rank, split, mask, kernels)
    else:
        title = "ring steps of this rank"
        lines = describe_steps(ctx.layout, ctx.rank, mask, kernels)
    head = f"{q.dtype} on {q.device.type}, head dim {q.shape[-1]}"
    key = (title, head, tuple(lines))
    if key in ctx.reported_steps:
        ctx.reported_steps[key].append(node.name)
        return
    ctx.reported_steps[key] = [node.name]
    ctx.report.steps.append((title, ctx.reported_steps[key], head, lines))
