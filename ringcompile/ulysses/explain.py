"""``explain``'s lines for a Ulysses site: the heads each rank takes and the one attention it
runs, in words."""

from __future__ import annotations

from ringcompile.kernels.registry import KernelPlan
from ringcompile.layout import make_layout
from ringcompile.masks import AttentionMask
from ringcompile.ring.explain import describe_steps
from ringcompile.ulysses.heads import HeadSplit

__all__ = ["describe_ulysses"]


def describe_ulysses(seq_len: int, split: HeadSplit, mask: AttentionMask,
                     kernels: KernelPlan) -> list[str]:  # fmt: skip
    """The all-to-all and the attention over the whole sequence that a rank of ``split`` runs."""
    kv = f"{split.kv_per_rank} of {split.kv_heads} KV heads"
    if split.kv_heads < split.size:
        kv += f" (each on {split.size // split.kv_heads} ranks, their gradients summed)"
    lines = [f"all-to-all over heads: {split.q_per_rank} of {split.heads} query heads and {kv}"]
    whole = make_layout("contiguous", seq_len, 1)
    for line in describe_steps(whole, 0, mask, kernels):
        lines.append(line.replace("step 0 (own block)", f"the whole sequence of {seq_len}"))
    return lines
