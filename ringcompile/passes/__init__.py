"""The FX passes of the ``ring`` backend, in the order they run.

Each pass is a function ``run(ctx: RingContext) -> None`` in its own module, whose docstring says
what it expects and what it guarantees, with the graph before and after. They run in this order:

1. ``find_attention``   — the SDPA calls to make ring attention, and the sequence they attend over;
2. ``plan_sequence``    — which nodes compute on this rank's tokens, and where full tensors enter;
3. ``fix_positions``    — tensors of token positions (aranges, position ids, rotary tables sliced to
                          the length) become this rank's global positions;
4. ``shard_sequence``   — every other full tensor entering the sharded region is sharded, sizes
                          baked into views become local, and sharded values that leave are gathered;
5. ``swap_attention``   — each sharded SDPA becomes the ring attention op;
6. ``sync_gradients``   — gradients: full outputs give 1/W shares, parameters sum over the ring.
"""

from __future__ import annotations

from ringcompile.passes import (
    find_attention,
    fix_positions,
    plan_sequence,
    shard_sequence,
    swap_attention,
    sync_gradients,
)
from ringcompile.passes.context import RingContext

PASSES = [
    find_attention.run,
    plan_sequence.run,
    fix_positions.run,
    shard_sequence.run,
    swap_attention.run,
    sync_gradients.run,
]

__all__ = ["PASSES", "RingContext", "run_passes"]


def run_passes(ctx: RingContext) -> None:
    for p in PASSES:
        p(ctx)
        ctx.gm.graph.lint()
    ctx.gm.recompile()
