"""Which ring steps run, and what each step's block is: a function of the layout and the mask's
options alone, so every rank works out every rank's plan without talking.

The run (``forward.py``, ``backward.py``) and ``explain`` (``explain.py``) read the same plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ringcompile.blocks import Piece, disjoint, layout_block_pieces
from ringcompile.layout import Layout
from ringcompile.masks import PositionRules

__all__ = ["Step", "StepPlan", "first_hop_dtype", "rank_steps", "step_plan"]


@dataclass(frozen=True)
class StepPlan:
    num_steps: int  # ring steps run (K/V sent num_steps - 1 times)
    compute: tuple[tuple[bool, ...], ...]  # compute[rank][step]: whether the block can be seen


@functools.lru_cache(maxsize=128)
def step_plan(layout: Layout, rules: PositionRules) -> StepPlan:
    """Which ring steps hold any (query, key) pair the position rules allow, for every rank. Steps
    empty on every rank (a causal or sliding-window ring) are neither computed nor sent: the ring
    runs as many steps as the farthest rank needs."""
    W = layout.world_size
    compute = tuple(
        tuple(
            rules.any_allowed(layout.positions(r), layout.positions((r - s) % W), layout.seq_len)
            for s in range(W)
        )
        for r in range(W)
    )
    needed = [s for s in range(W) if any(compute[r][s] for r in range(W))]
    num_steps = needed[-1] + 1 if needed else 1
    return StepPlan(num_steps, compute)


@dataclass(frozen=True)
class Step:
    """One ring step of one rank: its queries against the keys of rank ``source``."""

    index: int
    source: int
    computed: bool  # False: the position rules leave the block empty
    # the block's plain pieces (``ringcompile.blocks``), or None where only per-element rules
    # describe it (a masked block)
    pieces: tuple[Piece, ...] | None


@functools.lru_cache(maxsize=1024)
def rank_steps(layout: Layout, rules: PositionRules, masked: bool, rank: int) -> tuple[Step, ...]:
    """``rank``'s steps under a mask with these position ``rules``; ``masked``: the mask needs more
    than full and causal rules (``AttentionMask.masked``), so no block is plain pieces."""
    plan = step_plan(layout, rules)
    W = layout.world_size
    return tuple(
        Step(s, (rank - s) % W, plan.compute[rank][s],
             None if masked else layout_block_pieces(layout, rank, (rank - s) % W, rules.causal))
        for s in range(plan.num_steps)
    )  # fmt: skip


def first_hop_dtype(step: Step, fused_plain: bool, dtype: torch.dtype,
                    acc: torch.dtype) -> torch.dtype:  # fmt: skip
    """The dtype of the dK/dV accumulator a rank passes on after its ring ``step`` 1. It holds at
    most one contribution per element when that step's block is skipped, or is plain pieces over
    disjoint keys for a fused kernel, which returns them in the inputs' dtype: sent as they are,
    the hop carries the same values in half the bytes. Every rank works it out for its sender
    the same way, from the sender's plan."""
    if not fused_plain or dtype == acc:
        return acc
    if not step.computed:
        return dtype  # zeros
    if step.pieces is None:
        return acc
    return dtype if disjoint((p.key_start, p.key_stop) for p in step.pieces) else acc
