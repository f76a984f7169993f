"""Pass 6: tensors of token positions become this rank's global positions.

Expects: ``ctx.shard_points`` with their kinds (pass 5).
Guarantees: each shard point that holds positions — an ``arange`` over the sequence, a
``position_ids``/``cache_position`` input, anything whose sequence dim comes from those alone
(cos/sin of rotary embeddings), a per-position table sliced to the length (``cos_cached[:S]``) —
has a local version ``ring_shard(t, dim)`` that the sharded region uses. The full tensor is
computed as the model wrote it, in natural order (O(S) work per rank), so ops that mix along it
(``cumsum``, ``diff``) stay right; selecting this rank's entries of it is exactly "the global
positions of this rank's tokens", whatever the layout. No knowledge of rotary embeddings is
needed.

    pos = torch.arange(4096); cos = f(pos)[None, None]; q * cos
    -> cos_local = ring_shard(cos, 2); q_local * cos_local
"""

from __future__ import annotations

from ringcompile.passes.context import RingContext
from ringcompile.passes.fx_utils import source_line

POSITION_KINDS = ("positions", "table")


def run(ctx: RingContext) -> None:
    for node, dim in ctx.shard_points.items():
        kind = ctx.shard_kinds[node]
        if kind not in POSITION_KINDS:
            continue
        ctx.local[node] = (ctx.shard_of(node, dim), dim)
        what = "table sliced to the length" if kind == "table" else "positions"
        ctx.report.positions.append(f"{node.name} (dim {dim}, {what}) at {source_line(node)}")
