"""Sequence layouts: which global token positions each rank of a ring holds.

A layout is one object: a permutation ``perm`` of the (padded) global sequence such that rank ``r``
holds the contiguous slice ``perm[r * local_len : (r + 1) * local_len]`` of it, and the inverse
permutation that undoes it. Everything else (the positions a rank's tokens have, sharding a tensor,
gathering it back) is derived from those two.

The padded length is the smallest multiple of the layout's granularity (``world_size`` chunks for
contiguous and striped, ``2 * world_size`` for zigzag) that holds ``seq_len``; positions
``>= seq_len`` are padding, and the ring op treats them as keys no query may see.

- contiguous: rank r holds positions ``[r*L, (r+1)*L)``; causal work is unbalanced (rank W-1 does W
  times the work of rank 0);
- striped: rank r holds positions ``r, r+W, r+2W, ...``; every rank does the same causal work up to
  one token per step;
- zigzag: the sequence is cut into 2W chunks and rank r holds chunks r and 2W-1-r; balanced too, and
  whole chunks stay contiguous (friendlier to tiles that skip on causality).

Two levels (``SplitLayout``, named ``"<layout>/<U>"``): one of those layouts over R ring ranks, each
ring rank's tokens cut into U contiguous pieces held by the U ranks of a head group. An all-to-all
over heads inside the group puts a ring rank's tokens back together, in its order, for a ring over
R (``ringcompile.ulysses``).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "Layout",
    "ContiguousLayout",
    "StripedLayout",
    "ZigzagLayout",
    "SplitLayout",
    "make_layout",
    "LAYOUTS",
]


class _SelectRows(torch.autograd.Function):
    """``x.index_select(dim, idx)`` of distinct ``idx``, whose gradient is copied back into place
    (``index_copy_``) rather than added (``index_add_``, index_select's own backward: atomic adds,
    which on a model's logits in bf16 cost tens of milliseconds)."""

    @staticmethod
    def forward(ctx, x, dim, idx):
        ctx.dim, ctx.shape = dim, x.shape
        ctx.save_for_backward(idx)
        return x.index_select(dim, idx)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return g.new_zeros(ctx.shape).index_copy_(ctx.dim, idx, g), None, None


def _select_rows(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:
        return x.index_select(dim, idx)
    return _SelectRows.apply(x, dim, idx)


class Layout:
    """A load-balancing permutation of a sequence of ``seq_len`` tokens over ``world_size`` ranks.

    Subclasses define the permutation arithmetically (``_positions``, ``_sharded_index``) with
    ``arange`` and integer ops only, so that a compiler tracing ``shard``/``unshard`` records a
    few index ops instead of tensor constants.
    """

    name: str = ""
    #: the padded length must be a multiple of ``granularity * world_size``
    granularity: int = 1

    def __init__(self, seq_len: int, world_size: int, split: int = 1):
        """``split``: each rank's tokens must cut into this many equal pieces (``SplitLayout``)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = int(seq_len)
        self.world_size = int(world_size)
        self.split = int(split)
        unit = self.granularity * self.world_size * self.split
        self.padded_len = math.ceil(self.seq_len / unit) * unit
        self.local_len = self.padded_len // self.world_size

    # -- the permutation, defined by subclasses -------------------------------------------------
    def _positions(self, rank: int, device) -> torch.Tensor:
        """Global positions of rank ``rank``'s local tokens (int64)."""
        raise NotImplementedError

    def _sharded_index(self, pos: torch.Tensor) -> torch.Tensor:
        """For global positions ``pos``, their index in sharded order (the inverse permutation)."""
        raise NotImplementedError

    @functools.cached_property
    def perm(self) -> torch.Tensor:
        """``perm[j]`` = global position of the j-th token in sharded order (int64, CPU)."""
        return torch.cat([self._positions(r, "cpu") for r in range(self.world_size)])

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """``inverse[p]`` = index in sharded order of global position ``p`` (length ``padded_len``)."""
        return self._sharded_index(torch.arange(self.padded_len))

    # -- derived -------------------------------------------------------------------------------
    @property
    def pad(self) -> int:
        return self.padded_len - self.seq_len

    @property
    def identity(self) -> bool:
        """Whether one rank holds every token in natural order: a ring of one, whatever the
        layout (``test_layouts_are_permutations_with_inverses``). Sharding and gathering then give
        the tensor itself (padded, or cut back), as the model has it."""
        return self.world_size == 1

    def real(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Which of ``rank``'s local tokens are real (not padding), as a bool tensor."""
        return self.positions(rank, device) < self.seq_len

    def positions(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions (int64) of rank ``rank``'s local tokens, in local order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for a ring of {self.world_size}")
        return self._positions(rank, device if device is not None else "cpu")

    def shard(self, x: torch.Tensor, dim: int, rank: int, fill: float = 0) -> torch.Tensor:
        """This rank's tokens of a full tensor ``x`` whose ``dim`` is the global sequence.

        Pads with ``fill`` when ``seq_len`` does not divide; no communication.
        """
        dim = dim % x.dim()
        if x.shape[dim] != self.seq_len:
            raise ValueError(
                f"shard: dim {dim} of a tensor of shape {tuple(x.shape)} should be the sequence "
                f"of length {self.seq_len}"
            )
        if self.pad:
            pad_shape = list(x.shape)
            pad_shape[dim] = self.pad
            x = torch.cat([x, x.new_full(pad_shape, fill)], dim)
        if self.identity:
            return x
        return _select_rows(x, dim, self.positions(rank, x.device))

    def unshard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Natural-order tensor from one whose ``dim`` is the whole sharded-order sequence
        (the ranks' local slices concatenated in rank order); drops padding."""
        dim = dim % x.dim()
        if x.shape[dim] != self.padded_len:
            raise ValueError(
                f"unshard: dim {dim} of a tensor of shape {tuple(x.shape)} should be the padded "
                f"sharded sequence of length {self.padded_len}"
            )
        if self.identity:
            return x.narrow(dim, 0, self.seq_len)
        idx = self._sharded_index(torch.arange(self.seq_len, device=x.device))
        return _select_rows(x, dim, idx)

    def _key(self) -> tuple:
        return (type(self), self.seq_len, self.world_size, self.split)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        split = f", split={self.split}" if self.split > 1 else ""
        return f"{type(self).__name__}(seq_len={self.seq_len}, world_size={self.world_size}{split})"


class ContiguousLayout(Layout):
    name = "contiguous"

    def _positions(self, rank, device):
        return torch.arange(rank * self.local_len, (rank + 1) * self.local_len, device=device)

    def _sharded_index(self, pos):
        return pos


class StripedLayout(Layout):
    name = "striped"

    # rank r, local index i  <->  global position i * W + r
    def _positions(self, rank, device):
        return torch.arange(self.local_len, device=device) * self.world_size + rank

    def _sharded_index(self, pos):
        return (pos % self.world_size) * self.local_len + pos // self.world_size


class ZigzagLayout(Layout):
    name = "zigzag"
    granularity = 2

    # chunks of L/2 tokens; rank r holds chunks r and 2W-1-r
    def _positions(self, rank, device):
        c = self.local_len // 2
        first = torch.arange(c, device=device)
        return torch.cat([first + rank * c, first + (2 * self.world_size - 1 - rank) * c])

    def _sharded_index(self, pos):
        W, c = self.world_size, self.local_len // 2
        chunk, offset = pos // c, pos % c
        second = chunk >= W
        rank = torch.where(second, 2 * W - 1 - chunk, chunk)
        return rank * self.local_len + second.long() * c + offset


class SplitLayout(Layout):
    """``inner`` over R ring ranks, each ring rank's tokens cut into ``heads`` contiguous pieces:
    ring rank r's piece u is held by rank ``r * heads + u`` (``heads_major``: ``u * R + r``) of the
    U × R ranks, the order of the flattened mesh whose dims are (ring, heads) (or (heads, ring)).
    Named ``"<inner>/<U>"`` (``"<inner>/<U>/heads-major"``)."""

    def __init__(self, inner: Layout, heads: int, heads_major: bool = False):
        if inner.split != heads:
            raise ValueError(f"{inner!r} is not cut into {heads} pieces a rank")
        self.inner, self.heads, self.heads_major = inner, int(heads), bool(heads_major)
        self.seq_len, self.split = inner.seq_len, 1
        self.world_size = inner.world_size * self.heads
        self.padded_len = inner.padded_len
        self.local_len = inner.local_len // self.heads

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.inner.name}/{self.heads}" + ("/heads-major" if self.heads_major else "")

    def ring_rank(self, rank: int) -> tuple[int, int]:
        """(ring rank, piece) of ``rank``."""
        R = self.inner.world_size
        return (rank % R, rank // R) if self.heads_major else divmod(rank, self.heads)

    def _rank(self, ring_rank, piece):
        return piece * self.inner.world_size + ring_rank if self.heads_major else (
            ring_rank * self.heads + piece)  # fmt: skip

    def _positions(self, rank, device):
        r, u = self.ring_rank(rank)
        n = self.local_len
        return self.inner._positions(r, device)[u * n : (u + 1) * n]

    def _sharded_index(self, pos):
        index, n = self.inner._sharded_index(pos), self.local_len
        r, offset = index // self.inner.local_len, index % self.inner.local_len
        return self._rank(r, offset // n) * n + offset % n

    def _key(self) -> tuple:
        return (type(self), self.inner._key(), self.heads, self.heads_major)

    def __repr__(self) -> str:
        order = ", heads_major=True" if self.heads_major else ""
        return f"SplitLayout({self.inner!r}, heads={self.heads}{order})"


LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (ContiguousLayout, StripedLayout, ZigzagLayout)
}


def make_layout(layout: str | Layout, seq_len: int, world_size: int) -> Layout:
    """A layout object from a name (``"zigzag"``, or ``"zigzag/2"`` for a ``SplitLayout``), or
    check that a given object fits ``seq_len`` and the ring."""
    if isinstance(layout, Layout):
        if layout.seq_len != seq_len or layout.world_size != world_size:
            raise ValueError(
                f"{layout!r} does not fit a sequence of {seq_len} tokens over {world_size} ranks"
            )
        return layout
    inner, *split = layout.split("/")
    if split:
        heads = int(split[0])
        if world_size % heads:
            raise ValueError(f"layout {layout!r}: {heads} ranks a head group do not divide "
                             f"{world_size}")  # fmt: skip
        inner_layout = make_layout(inner, seq_len, world_size // heads)
        inner_layout = type(inner_layout)(seq_len, world_size // heads, split=heads)
        return SplitLayout(inner_layout, heads, heads_major=split[1:] == ["heads-major"])
    try:
        cls = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}") from None
    return cls(seq_len, world_size)
