"""The FX passes of the ``ring`` backend, in the order they run.

Each pass is a function ``run(ctx: RingContext) -> None`` in its own module, whose docstring says
what it expects and what it guarantees, with the graph before and after. They run in this order:

0. ``normalize``        — one spelling per op (operators as ``operator`` functions, torch
                          functions that are tensor methods as methods, SDPA's options by name);
1. ``decode_attention`` — attention over a sharded KV cache (a decode step) becomes tree attention;
2. ``find_attention``   — the SDPA calls to make ring attention, and the sequence they attend over;
3. ``unexpand_kv``      — K/V expanded by ``repeat_kv`` go back to their KV heads (GQA);
4. ``lift_masks``       — dense masks built from indices become per-token facts (causal, window,
                          key padding, documents);
5. ``outline_experts``  — a mixture-of-experts dispatch (tokens sorted by expert, grouped matmuls,
                          the inverse permutation) becomes one op that computes each row alone;
6. ``unflatten_rows``   — tokens flattened with the batch into rows, computed on row by row and
                          split back, stay in (batch, sequence) form;
7. ``plan_sequence``    — which nodes compute on this rank's tokens, and where full tensors enter;
8. ``shard_sequence``   — every full tensor entering the sharded region is sharded (positions
                          become this rank's global positions), sizes baked into views become
                          local, and sharded values that leave are gathered;
9. ``shard_reductions`` — sums, means and cross-entropy losses over the sequence of local values
                          become a partial per rank and one all-reduce, instead of a gather;
10. ``swap_attention``  — each sharded SDPA becomes the ring attention op;
11. ``sync_gradients``  — gradients: full outputs give 1/W shares, parameters sum over the ring.

What passes share lives in helper modules, never in another pass (a test checks): ``context``
(``RingContext``: the graph, the ring, what each pass found), ``dims`` (how dims pass through
ops), ``aliases`` (which nodes share memory and which change it in place), ``fx_utils`` (SDPA
calls, source lines), ``patterns`` (model idioms: ``repeat_kv``, the
sharded KV cache), ``mask_reader`` (a dense mask's graph read back as an ``AttentionMask``) and
``outlined`` (an outlined region that computes each row alone).
"""

from __future__ import annotations

from ringcompile.passes import (
    decode_attention,
    find_attention,
    lift_masks,
    normalize,
    outline_experts,
    plan_sequence,
    shard_reductions,
    shard_sequence,
    swap_attention,
    sync_gradients,
    unexpand_kv,
    unflatten_rows,
)
from ringcompile.passes.context import RingContext

PASSES = [
    normalize.run,
    decode_attention.run,
    find_attention.run,
    unexpand_kv.run,
    lift_masks.run,
    outline_experts.run,
    unflatten_rows.run,
    plan_sequence.run,
    shard_sequence.run,
    shard_reductions.run,
    swap_attention.run,
    sync_gradients.run,
]

__all__ = ["PASSES", "RingContext", "run_passes"]


def run_passes(ctx: RingContext) -> None:
    for p in PASSES:
        p(ctx)
        ctx.gm.graph.lint()
    ctx.gm.recompile()
    # gathers that only fed a lifted mask were removed with it: report the ones that run
    alive = set(ctx.gm.graph.nodes)
    ctx.report.gathers = [why for g, why in ctx.gather_reasons.items() if g in alive]
