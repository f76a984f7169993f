"""The FX passes of the ``ring`` backend, in the order they run.

Each pass is a function ``run(ctx: RingContext) -> None`` in its own module, whose docstring says
what it expects and what it guarantees, with the graph before and after. They run in this order:

0. ``flex_attention``   — a flex_attention call becomes SDPA with the mask its mask_mod describes;
1. ``normalize``        — one spelling per op (operators as ``operator`` functions, torch
                          functions that are tensor methods as methods, SDPA's options by name);
2. ``eager_attention``  — attention written out (matmul, softmax, matmul; a soft cap) becomes SDPA;
3. ``decode_attention`` — attention over a sharded KV cache (a decode step) becomes tree attention;
4. ``find_attention``   — the SDPA calls to make ring attention, and the sequence they attend over;
5. ``unexpand_kv``      — K/V expanded by ``repeat_kv`` go back to their KV heads (GQA);
6. ``lift_masks``       — dense masks built from indices become per-token facts (causal, window,
                          key padding, documents);
7. ``outline_experts``  — a mixture-of-experts dispatch (tokens sorted by expert, grouped matmuls,
                          the inverse permutation) becomes one op that computes each row alone;
8. ``unflatten_rows``   — tokens flattened with the batch into rows, computed on row by row and
                          split back, stay in (batch, sequence) form;
9. ``plan_sequence``    — which nodes compute on this rank's tokens, and where full tensors enter;
10. ``shard_sequence``  — every full tensor entering the sharded region is sharded (positions
                          become this rank's global positions), sizes baked into views become
                          local, and sharded values that leave are gathered;
11. ``shard_reductions``— sums, means and cross-entropy losses over the sequence of local values
                          become a partial per rank and one all-reduce, instead of a gather;
12. ``swap_attention``  — each sharded SDPA becomes the ring attention op;
13. ``sync_gradients``  — gradients: full outputs give 1/W shares, parameters sum over the ring.

What passes share lives in helper modules, never in another pass (a test checks): ``context``
(``RingContext``: the graph, the ring, what each pass found), ``dims`` (how dims pass through
ops), ``aliases`` (which nodes share memory and which change it in place), ``fx_utils`` (SDPA
calls, source lines), ``idioms`` (model idioms: ``repeat_kv``, the
sharded KV cache), ``mask_reader`` (a dense mask's graph read back as an ``AttentionMask``) and
``rowwise_region`` (an outlined region that computes each row alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ringcompile.passes import (
    decode_attention,
    eager_attention,
    find_attention,
    flex_attention,
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


@dataclass(frozen=True)
class Pass:
    """A pass and the passes whose results it reads (``run_passes`` checks they ran before it)."""

    run: Callable[[RingContext], None]
    reads: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.run.__module__.rsplit(".", 1)[-1]


PASSES = (
    Pass(flex_attention.run),
    Pass(normalize.run),
    Pass(eager_attention.run, reads=("normalize",)),
    Pass(decode_attention.run, reads=("normalize",)),
    Pass(find_attention.run, reads=("normalize",)),
    Pass(unexpand_kv.run, reads=("find_attention",)),
    Pass(lift_masks.run, reads=("find_attention",)),
    Pass(outline_experts.run, reads=("find_attention",)),
    Pass(unflatten_rows.run, reads=("find_attention",)),
    Pass(plan_sequence.run, reads=("find_attention", "unexpand_kv", "lift_masks")),
    Pass(shard_sequence.run, reads=("plan_sequence",)),
    Pass(shard_reductions.run, reads=("shard_sequence",)),
    Pass(swap_attention.run, reads=("lift_masks", "shard_sequence")),
    Pass(sync_gradients.run, reads=("shard_sequence", "shard_reductions")),
)

__all__ = ["PASSES", "Pass", "RingContext", "run_passes"]


def run_passes(ctx: RingContext, passes: tuple[Pass, ...] = PASSES) -> None:
    """Runs ``passes`` in order (a prefix of ``PASSES`` in tests of one pass), checking each
    one's inputs were made and the graph is well formed after it."""
    done: set[str] = set()
    for p in passes:
        missing = [r for r in p.reads if r not in done]
        if missing:
            raise RuntimeError(f"pass {p.name} reads the results of {missing}, which did not run "
                               "before it")  # fmt: skip
        p.run(ctx)
        ctx.gm.graph.lint()
        done.add(p.name)
    ctx.gm.recompile()
    # gathers that only fed a lifted mask were removed with it: report the ones that run
    alive = set(ctx.gm.graph.nodes)
    ctx.report.gathers = [why for g, why in ctx.gather_reasons.items() if g in alive]
