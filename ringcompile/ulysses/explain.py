"""``explain``'s lines for a Ulysses or two-level site: the heads each rank takes and the attention
it runs, in words."""

from __future__ import annotations

from ringcompile.kernels.registry import KernelPlan
from ringcompile.layout import SplitLayout, make_layout
from ringcompile.masks import AttentionMask
from ringcompile.ring.explain import describe_steps
from ringcompile.ulysses.heads import HeadSplit

__all__ = ["describe_two_levels", "describe_ulysses"]


def _heads(split: HeadSplit) -> str:
    kv = f"{split.kv_per_rank} of {split.kv_heads} KV heads"
    if split.kv_heads < split.size:
        kv += f" (each on {split.size // split.kv_heads} ranks, their gradients summed)"
    return f"{split.q_per_rank} of {split.heads} query heads and {kv}"


def describe_ulysses(seq_len: int, split: HeadSplit, mask: AttentionMask,
                     kernels: KernelPlan) -> list[str]:  # fmt: skip
    """The all-to-all and the attention over the whole sequence that a rank of ``split`` runs."""
    lines = [f"all-to-all over heads: {_heads(split)}"]
    whole = make_layout("contiguous", seq_len, 1)
    for line in describe_steps(whole, 0, mask, kernels):
        lines.append(line.replace("step 0 (own block)", f"the whole sequence of {seq_len}"))
    return lines


def describe_two_levels(layout: SplitLayout, rank: int, split: HeadSplit, mask: AttentionMask,
                        kernels: KernelPlan) -> list[str]:  # fmt: skip
    """The all-to-all inside ``rank``'s head group, then the ring steps of its heads."""
    ring_rank, piece = layout.ring_rank(rank)
    R = layout.inner.world_size
    lines = [
        f"all-to-all over heads inside a group of {split.size} ranks (this rank holds piece "
        f"{piece} of ring rank {ring_rank}'s tokens): {_heads(split)}",
        f"then a ring of {R} over the {layout.inner.name} layout, as ring rank {ring_rank}:",
    ]
    return lines + describe_steps(layout.inner, ring_rank, mask, kernels)
