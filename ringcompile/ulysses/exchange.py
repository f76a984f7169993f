"""The all-to-alls of Ulysses: between the layout's tokens of every head and every token of the
group, of a group of heads.

``to_heads`` and ``from_heads`` are each one ``all_to_all_single`` over chunks of equal size: rank
j receives, from every rank, that rank's tokens of the heads ``heads_of[j]``. Giving every rank the
same heads makes the same exchange an all-gather, which is how the per-token facts (document ids,
key validity; a per-key bias without heads) reach every rank.

Given the layout (``natural``), the sequence is put into natural order on arrival and back into
the layout's order before leaving, so the attention in between sees positions ``0 .. seq_len - 1``
in order (causal by index, documents contiguous) and the layout's padding never reaches it.
Without it the tokens stay in the order they arrive: the group's pieces in rank order, which for
two levels (``SplitLayout``) is one ring rank's tokens in the ring's layout.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ringcompile.layout import Layout
from ringcompile.ring import events

__all__ = ["from_heads", "to_heads"]


@functools.lru_cache(maxsize=64)
def _natural_index(layout: Layout, device: torch.device) -> torch.Tensor:
    """For each position of the sequence in natural order, its index in sharded order."""
    return layout.inverse[: layout.seq_len].to(device)


@functools.lru_cache(maxsize=64)
def _sharded_positions(layout: Layout, device: torch.device) -> torch.Tensor:
    """For each index in sharded order, its position (padding: past ``seq_len``)."""
    return layout.perm.to(device)


@functools.lru_cache(maxsize=64)
def _index(heads_of: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads_of, dtype=torch.int64).flatten().to(device)


def _all_to_all(chunks: torch.Tensor, group: dist.ProcessGroup | None,
                fresh: bool) -> torch.Tensor:  # fmt: skip
    """``chunks`` (U, ...): chunk j goes to rank j; returns (U, ...), chunk i from rank i.
    ``fresh``: never ``chunks`` itself (a group of one copies), where the caller returns it as it
    is (the op's outputs may alias none of its inputs)."""
    if group is None:
        return chunks.clone() if fresh else chunks
    events.record("all_to_alls")
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return out


def to_heads(x: torch.Tensor, heads_of: tuple[tuple[int, ...], ...], natural: Layout | None,
             group: dist.ProcessGroup | None) -> torch.Tensor:  # fmt: skip
    """``x`` (B, heads, S_local, ...): this rank's tokens, every head. Returns (B, h, n, ...):
    the group's tokens of the heads ``heads_of[rank]`` (h of them; every rank names as many), in
    natural order (the ``seq_len`` tokens of the layout ``natural``) or as they arrive
    (``natural`` None: n = the group's size × S_local)."""
    U, h = len(heads_of), len(heads_of[0])
    picked = x.index_select(1, _index(heads_of, x.device)) if heads_of != _all(x, U) else x
    send = picked.unflatten(1, (U, h)).movedim(1, 0).contiguous()  # (U, B, h, S_local, ...)
    got = _all_to_all(send, group, fresh=natural is None)  # chunk i: rank i's tokens
    arrived = got.movedim(0, 2).flatten(2, 3)  # (B, h, U * S_local, ...) in the layout's order
    if natural is None:
        return arrived
    return arrived.index_select(2, _natural_index(natural, x.device))


def from_heads(y: torch.Tensor, heads_of: tuple[tuple[int, ...], ...], heads: int,
               natural: Layout | None, group: dist.ProcessGroup | None) -> torch.Tensor:  # fmt: skip
    """The way back of ``to_heads``: ``y`` (B, h, n, ...), every token of the group, of this
    rank's heads, in natural order or as they arrived. Returns (B, heads, S_local, ...), this
    rank's tokens of every head; a head that several ranks held (a KV head shared by their query
    heads) gets the sum of what they sent."""
    U = len(heads_of)
    B, h = y.shape[:2]
    if natural is not None:
        if natural.pad:
            y = torch.cat([y, y.new_zeros((B, h, natural.pad, *y.shape[3:]))], 2)
        y = y.index_select(2, _sharded_positions(natural, y.device))
    send = y.unflatten(2, (U, y.shape[2] // U)).movedim(2, 0).contiguous()
    got = _all_to_all(
        send, group, fresh=natural is None
    )  # chunk j: this rank's tokens of rank j's heads
    parts = got.movedim(0, 1).flatten(1, 2)  # (B, U * h, S_local, ...)
    if heads == parts.shape[1] and heads_of == _all(parts, U):
        return parts
    out = parts.new_zeros((B, heads, *parts.shape[2:]))
    return out.index_add_(1, _index(heads_of, y.device), parts)


def _all(x: torch.Tensor, U: int) -> tuple[tuple[int, ...], ...]:
    """The split in which rank j takes the j-th of U equal runs of ``x``'s heads (dim 1)."""
    h = x.shape[1] // U
    return tuple(tuple(range(j * h, (j + 1) * h)) for j in range(U))
