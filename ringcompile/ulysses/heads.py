"""Which heads each rank of an all-to-all group attends for.

Rank r takes query heads ``[r * H/U, (r + 1) * H/U)``. The KV heads it needs are those its query
heads use (query head i uses KV head ``i // (H / Hkv)``, as SDPA's GQA): ``Hkv / U`` of them where
U divides Hkv, else one, shared with the other ranks whose query heads use it (U a multiple of
Hkv). Each KV head goes only to the ranks that use it, and their gradients are summed back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["HeadSplit", "split_refusal"]


def split_refusal(heads: int, kv_heads: int, size: int) -> str | None:
    """Why ``heads`` query heads and ``kv_heads`` KV heads cannot be split over ``size`` ranks
    (None: they can)."""
    if heads % size:
        return f"{heads} query heads do not divide over {size} ranks"
    if kv_heads % size and size % kv_heads:
        return (
            f"{kv_heads} KV heads over {size} ranks: neither divides the other, so a rank's "
            "query heads would use parts of two KV heads"
        )
    return None


@dataclass(frozen=True)
class HeadSplit:
    heads: int
    kv_heads: int
    size: int

    @classmethod
    def of(cls, heads: int, kv_heads: int, size: int) -> HeadSplit:
        why = split_refusal(heads, kv_heads, size)
        if why is not None:
            raise ValueError(
                f"Ulysses attention splits heads over the ranks: {why}. Use strategy='ring' "
                "(or 'auto', which chooses the ring for such a site)"
            )
        return cls(heads, kv_heads, size)

    @property
    def q_per_rank(self) -> int:
        return self.heads // self.size

    @property
    def kv_per_rank(self) -> int:
        return max(self.kv_heads // self.size, 1)

    @functools.cached_property
    def kv_heads_of(self) -> tuple[tuple[int, ...], ...]:
        """``kv_heads_of[r]``: the KV heads rank r attends with, in order."""
        group = self.heads // self.kv_heads  # query heads per KV head
        out = []
        for r in range(self.size):
            first = r * self.q_per_rank // group
            out.append(tuple(range(first, first + self.kv_per_rank)))
        return tuple(out)
