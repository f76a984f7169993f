"""How each attention site attends over the sharded sequence: as a ring, or by Ulysses' all-to-all
over heads (``ringcompile.ulysses``), or in two levels over a (heads, ring) mesh. The backend's
``strategy`` option forces one, or lets ``choose`` decide per site ("auto", the default), and
``explain`` prints the choice with its reason.

"auto" decides from what the site's blocks would be, as ``benchmarks/bench_strategies.py``
measured each strategy's compute on one H100 (RESULTS.md). Plain blocks (no mask, causal) run on
cuDNN and hide each K/V transfer under the next block, so the ring stays: Ulysses' four
all-to-alls are not hidden. A mask makes every ring step a masked block with a fixed cost of its
own, W of them per call, while Ulysses attends once over the whole sequence on the one-GPU kernel
for that mask. Packed documents (on the varlen kernel there) go to Ulysses from 2 ranks on; a
window, chunks, a prefix or a per-key bias from ``MASKED_RING_STEPS`` ranks on, below which the
ring's few steps cost less than the all-to-alls. Key padding alone stays on the ring, which drops it where it
hides no key (a tokenizer's all-ones ``attention_mask``) and runs plain blocks. A dense mask stays
on the ring: its rows are the queries' and would all have to reach every rank.

Over two mesh dims (``mesh_dim=("cp_a2a", "cp_ring")``), "auto" takes two levels wherever the heads
split over the first dim: the mesh says where the fast links are, and the all-to-all stays inside
them. A site that cannot split runs as a ring over every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from ringcompile.masks import AttentionMask
from ringcompile.ulysses import split_refusal

__all__ = ["STRATEGIES", "Choice", "choose"]

STRATEGIES = ("auto", "ring", "ulysses", "two-level")
# from this many ranks on, a window, chunks, a prefix or a key bias attend by Ulysses under "auto"
MASKED_RING_STEPS = 4


@dataclass(frozen=True)
class Choice:
    strategy: str  # "ring", "ulysses" or "two-level"
    reason: str
    refused: str | None = None  # why a forced "ulysses" or "two-level" runs as a ring instead


def choose(option: str, heads: int, kv_heads: int, size: int, mask: AttentionMask,
           heads_size: int | None = None) -> Choice:  # fmt: skip
    """The strategy of a site with these heads, on a group of ``size`` ranks, under ``mask``;
    ``heads_size``: the size of the all-to-all dim of a two-level group (None: one dim)."""
    if option == "ring":
        return Choice("ring", "strategy='ring'")
    two_levels = heads_size is not None and option in ("auto", "two-level")
    cannot = split_refusal(heads, kv_heads, heads_size if two_levels else size)
    if cannot is None and mask.dense is not None:
        cannot = "a dense mask's rows would all have to reach every rank"
    if cannot is None and mask.mask_mod is not None:
        cannot = "a mask_mod is evaluated on the ring's blocks"
    why = "auto" if option == "auto" else f"strategy={option!r}"
    if option != "auto" and cannot is not None:
        return Choice("ring", f"{cannot} ({why})", refused=cannot)
    if two_levels:
        if cannot is not None:
            return Choice("ring", f"{cannot} ({why})")
        return Choice(
            "two-level",
            f"an all-to-all over heads inside each group of {heads_size} ranks, a ring of "
            f"{size // heads_size} groups ({why})",
        )
    if option == "ulysses":
        return Choice("ulysses", "strategy='ulysses'")
    if size == 1:
        return Choice("ring", "a ring of one (auto)")
    if cannot is not None:
        return Choice("ring", f"{cannot} (auto)")
    r = mask.rules
    kinds = [name for name, present in (("documents", mask.document_ids is not None),
                                        ("window", r.window is not None), ("chunks", r.chunk > 0),
                                        ("a prefix", r.prefix > 0),
                                        ("key bias", mask.key_bias is not None)) if present]  # fmt: skip
    if kinds and (mask.document_ids is not None or size >= MASKED_RING_STEPS):
        return Choice(
            "ulysses",
            f"{', '.join(kinds)}: attended once over the whole sequence, not as a masked block at "
            f"each of {size} ring steps (auto)",
        )
    if kinds:
        return Choice(
            "ring",
            f"{', '.join(kinds)} on {size} ranks: {size} masked ring steps cost less than the "
            "all-to-alls (auto)",
        )
    if mask.key_padding_mask is not None:
        return Choice(
            "ring", "key padding alone: dropped where it hides no key, plain blocks (auto)"
        )
    return Choice("ring", "plain blocks hide the K/V transfers (auto)")
