"""``explain``'s lines for the ring steps of one rank: the plan the run follows, in words."""

from __future__ import annotations

from dataclasses import replace

from ringcompile.blocks import describe_block
from ringcompile.kernels.registry import KernelPlan, block_kind
from ringcompile.layout import Layout
from ringcompile.masks import AttentionMask
from ringcompile.ring.plan import rank_steps

__all__ = ["describe_steps"]


def describe_steps(
    layout: Layout, rank: int, mask: AttentionMask, kernels: KernelPlan
) -> list[str]:
    """Each ring step of ``rank``: the block it computes, what kind it is and which kernel runs
    it. Only which of ``mask``'s parts are present matters, so the passes describe theirs over
    graph nodes."""
    n = layout.local_len
    lines = []
    for step in rank_steps(layout, mask.rules, mask.masked, rank):
        where = "own block" if step.index == 0 else f"keys of rank {step.source}"
        if not step.computed:
            lines.append(f"step {step.index} ({where}): empty, skipped")
            continue
        kind = describe_block(step.pieces, n, n)
        kernel = kernels.spec(block_kind(step.pieces)).name
        lines.append(f"step {step.index} ({where}): {kind} -> {kernel}")
    if mask.key_padding_mask is not None and not replace(mask, key_padding_mask=None).masked:
        lines.append(
            "(key padding that hides no key on any rank is dropped at run time: the "
            "steps are then plain)"
        )
    return lines
