"""``explain``'s lines for the ring steps of one rank: the plan the run follows, in words."""

from __future__ import annotations

from dataclasses import replace

from ringcompile.blocks import chunk_piece, describe_block, layout_progression
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
    # a varlen block (``BlockMask.varlen``) where positions are one progression
    by_rules = (mask.document_ids is not None and not mask.softcap and not mask.rules.prefix
                and mask.mask_mod is None
                and all(t is None for t in (mask.key_padding_mask, mask.key_bias, mask.dense)))  # fmt: skip
    parts = [name for name, present in (("documents", mask.document_ids is not None),
                                        ("window", mask.rules.window is not None),
                                        ("chunks", mask.rules.chunk > 0)) if present]  # fmt: skip
    # chunks alone: a block that is one square per chunk goes to the plain kernel as a batch
    chunks_alone = (mask.rules.chunk > 0 and mask.document_ids is None and not mask.softcap
                    and mask.mask_mod is None
                    and all(t is None for t in (mask.key_padding_mask, mask.key_bias, mask.dense)))  # fmt: skip
    masked_kernel = kernels.spec("masked").name
    lines = []
    for step in rank_steps(layout, mask.rules, mask.masked, rank):
        where = "own block" if step.index == 0 else f"keys of rank {step.source}"
        if not step.computed:
            lines.append(f"step {step.index} ({where}): empty, skipped")
            continue
        varlen = by_rules and layout_progression(layout, rank, step.source) is not None
        kind = block_kind(step.pieces, varlen)
        kernel = kernels.spec(kind).name
        found = chunk_piece(layout_progression(layout, rank, step.source), mask.rules, n, n,
                            layout.seq_len) if chunks_alone and kernels.fused_plain else None  # fmt: skip
        if found is not None:
            m, p = found
            what = describe_block((p,), m, m).replace("causal diagonal", "causal")
            lines.append(f"step {step.index} ({where}): {what} in each of its {n // m} chunks "
                         f"-> {kernels.spec('plain').name}, one batched call")  # fmt: skip
            continue
        if kind == "varlen":
            what = f"varlen ({', '.join(parts)})"
            if kernel != masked_kernel:
                kernel += f" (ids not sorted along a row: {masked_kernel})"
        else:
            what = describe_block(step.pieces, n, n)
        if mask.mask_mod is not None:
            what += ", the mask_mod on this block"
        if mask.softcap:
            what += f", scores soft-capped at {mask.softcap:g}"
        lines.append(f"step {step.index} ({where}): {what} -> {kernel}")
    if mask.key_padding_mask is not None and not replace(mask, key_padding_mask=None).masked:
        lines.append(
            "(key padding that hides no key on any rank is dropped at run time: the "
            "steps are then plain)"
        )
    return lines
