"""Pass 13: gradients, so that every parameter's ``.grad`` is the one-process gradient.

Expects: the rewritten graph (passes 9–11).
Guarantees (see ``ringcompile.runtime`` for the invariant): each graph input that requires grad
(parameters, and inputs such as ``inputs_embeds``) is read through ``sum_grad_over_ring(x)``,
whose backward all-reduces its gradient over the ring exactly once; each full graph output that
requires grad goes through ``scale_grad(x, 1/W)``, so the ring's shares of its gradient sum to the
true one. One process (W = 1) needs neither.

    w = L_self_parameters_weight_; ...; return (logits,)
    -> w = sum_grad_over_ring(L_self_parameters_weight_); ...; return (scale_grad(logits, 0.5),)
"""

from __future__ import annotations

import torch
from torch.fx.node import map_arg

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import example
from ringcompile.runtime import scale_grad


def _requires_grad(node) -> bool:
    v = example(node)
    return isinstance(v, torch.Tensor) and v.requires_grad


def run(ctx: RingContext) -> None:
    if not ctx.seq_len or ctx.world_size == 1:
        return
    graph = ctx.gm.graph
    # an input that arrived sharded has this rank's tokens' gradient, summed over nothing
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and n not in ctx.arrived]
    summed = 0
    for p in placeholders:
        if not _requires_grad(p):
            continue
        # right after p: before every use, including a ring_shard(p) already placed there
        with graph.inserting_after(p):
            synced = graph.call_function(ctx.sum_grad_over_ring(), (p,))
        p.replace_all_uses_with(synced, delete_user_cb=lambda user: user is not synced)
        summed += 1
    if summed:
        ctx.report.gradients.append(
            f"{summed} input(s) requiring grad sum their gradient over the ring"
        )

    output = next(n for n in graph.nodes if n.op == "output")
    gathered = ctx.gathered
    factor = 1.0 / ctx.world_size
    scaled = []

    def scale(a):
        src = gathered.get(a, a)
        if a.op == "placeholder" or a in ctx.local_only or not _requires_grad(src):
            return a
        with graph.inserting_before(output):
            s = graph.call_function(scale_grad, (a, factor))
        scaled.append(a.name)
        return s

    output.args = map_arg(output.args, scale)
    if scaled:
        ctx.report.gradients.append(
            f"full outputs {', '.join(scaled)} give each rank a 1/{ctx.world_size} share of their gradient"
        )
