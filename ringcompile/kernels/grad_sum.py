"""A gradient summed over ring steps, with no pass over memory the sum does not need.

A fused SDPA kernel returns each block's dq, dk and dv as new tensors in the inputs' dtype. Added
one by one into an fp32 accumulator they cost a zeroing pass, an fp32 read-modify-write per block
and a conversion pass at the end, while at W = 2 no element of dq gets more than two
contributions, which one pass can sum straight into the answer (benchmarks/RESULTS.md measures
what such passes cost a ring call).

``GradSum`` holds each contribution as it came, over its region of the gradient, and sums them
only when it must: when a third contribution would meet two on one element (they are folded into
an fp32 accumulator, which counts as one), when a kernel that adds in place asks for the
accumulator, and at the end, in one pass per region into the dtype asked for. Every element is
summed in the accumulation dtype and rounded once, as the accumulator did.

Regions are index tuples of unit-step slices (``(slice(None), slice(None), rows)``); a ``part``
of a sum is a sum over one region of it, which kernels use as they would the whole.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["GradSum", "accumulators", "sums_over"]

Box = tuple[tuple[int, int], ...]
_ALL = slice(None)


def _box(index: tuple, shape: torch.Size) -> Box:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    box = []
    for sl, n in zip(index, shape):
        if sl == _ALL:
            box.append((0, n))
            continue
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError("GradSum regions are unit-step slices")
        box.append((start, max(start, stop)))
    return tuple(box)


def _inside(cell: Box, box: Box) -> bool:
    return all(b0 <= c0 and c1 <= b1 for (c0, c1), (b0, b1) in zip(cell, box))


def _meets(a: Box, b: Box) -> bool:
    return all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(a, b))


def _cells(boxes: list[Box], within: Box):
    """The cells the boxes' edges cut ``within`` into: each lies wholly inside or outside every
    box."""
    if all(_inside(within, b) for b in boxes):  # no box cuts it (the usual case at W = 1)
        return (within,)
    edges = []
    for d, (lo, hi) in enumerate(within):
        cuts = {lo, hi} | {e for b in boxes for e in b[d] if lo < e < hi}
        edges.append(sorted(cuts))
    return itertools.product(*[list(zip(e, e[1:])) for e in edges])


def _view(t: torch.Tensor, box: Box, cell: Box) -> torch.Tensor:
    """The part of ``t`` (which spans ``box``) over ``cell``."""
    return t[tuple(slice(c0 - b0, c1 - b0) for (c0, c1), (b0, _) in zip(cell, box))]


def _sum_into(out: torch.Tensor, items: list[torch.Tensor]) -> None:
    """``out`` = the sum of ``items`` (at most two), computed in the wider of the dtypes and
    rounded once. torch.add computes in its inputs' promoted dtype: two bf16 tensors summed into
    fp32 would be rounded to bf16 first, so then the first is copied and the second added."""
    if not items:
        out.zero_()
    elif len(items) == 1:
        if items[0] is not out:
            out.copy_(items[0])
    else:
        x, y = items
        wide = torch.promote_types(x.dtype, y.dtype)
        if torch.promote_types(wide, out.dtype) == wide:
            torch.add(x, y, out=out)
        else:
            if x is not out:
                out.copy_(x)
            out.add_(y)


class GradSum:
    """The sum of one gradient's contributions; ``dtype`` is the accumulation dtype."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device,
                 sole_dtype: torch.dtype | None = None):  # fmt: skip
        """``sole_dtype``: the result's dtype, where the caller knows that the sum gets exactly
        one contribution. A kernel that overwrites the whole of it then writes the result
        itself, rounded once as the conversion after would have been, with no fp32 buffer and
        no conversion pass."""
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = device
        self.sole_dtype = sole_dtype
        self.whole: Box = tuple((0, n) for n in self.shape)
        self.acc: torch.Tensor | None = None  # in ``dtype``, valid over ``self.valid``
        self.valid: list[Box] = []
        self.held: list[tuple[Box, torch.Tensor]] = []
        self.dest: torch.Tensor | None = None  # where ``flush`` leaves the sum (``over``)

    @classmethod
    def over(cls, t: torch.Tensor, fresh: bool = False) -> GradSum:
        """A sum whose result ``flush`` leaves in ``t``: added to what ``t`` holds, or, with
        ``fresh``, written over it."""
        s = cls(t.shape, t.dtype, t.device)
        s.dest = t
        if not fresh:
            s.acc, s.valid = t, [s.whole]
        return s

    def part(self, index: tuple) -> _Part:
        return _Part(self, _box(index, self.shape))

    # -- what kernels call -------------------------------------------------------------------
    def add(self, t: torch.Tensor, index: tuple = ()) -> None:
        """Add ``t`` to the region ``index`` (``t`` must not change until the sum is taken)."""
        self._add(t, _box(index, self.shape))

    def accumulator(self, overwrite: bool = False) -> torch.Tensor:
        """The sum so far as one tensor in ``dtype``, to add into in place. With ``overwrite``
        (only on an empty sum) its values are undefined: the caller writes every element."""
        return self._accumulator(self.whole, overwrite)

    @property
    def empty(self) -> bool:
        return self._empty(self.whole)

    # -- taking the sum ----------------------------------------------------------------------
    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The sum in ``dtype``, contiguous (a contribution itself when it is the whole sum)."""
        if self.acc is None and len(self.held) == 1:
            box, t = self.held[0]
            if box == self.whole and t.dtype == dtype and t.is_contiguous():
                return t
        if self.acc is not None and self.acc.dtype == dtype and self.acc.is_contiguous():
            self._fold()
            return self.acc
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        self._write(out)
        return out

    def flush(self) -> None:
        """Leave the sum in the tensor given to ``over``."""
        if self.acc is self.dest:
            self._fold()
        else:
            self._write(self.dest)

    # -- inside --------------------------------------------------------------------------------
    def _items(self, cell: Box) -> list[torch.Tensor]:
        items = (
            [_view(self.acc, self.whole, cell)] if any(_inside(cell, b) for b in self.valid) else []
        )
        return items + [_view(t, b, cell) for b, t in self.held if _inside(cell, b)]

    def _boxes(self) -> list[Box]:
        return self.valid + [b for b, _ in self.held]

    def _write(self, out: torch.Tensor) -> None:
        for cell in _cells(self._boxes(), self.whole):
            _sum_into(_view(out, self.whole, cell), self._items(cell))

    def _check_not_sole(self) -> None:
        if self.acc is not None and self.acc.dtype != self.dtype:
            raise RuntimeError("GradSum: a second contribution to a sum declared to get one "
                               "(sole_dtype)")  # fmt: skip

    def _add(self, t: torch.Tensor, box: Box) -> None:
        self._check_not_sole()
        if tuple(t.shape) != tuple(b1 - b0 for b0, b1 in box):
            raise ValueError(f"GradSum: a {tuple(t.shape)} contribution to a region of "
                             f"{tuple(b1 - b0 for b0, b1 in box)}")  # fmt: skip
        boxes = self._boxes()
        # (an empty sum, or one contribution, never holds two on one element: no cells to cut)
        if len(boxes) >= 2 and max(len(self._items(c)) for c in _cells(boxes, box)) >= 2:
            self._fold()
        self.held.append((box, t))

    def _fold(self) -> None:
        """Everything into the accumulator, valid everywhere."""
        if not self.held and self.valid == [self.whole]:
            return
        if self.acc is None:
            self._allocate()
        for cell in _cells(self._boxes(), self.whole):
            items = self._items(cell)
            if len(items) == 1 and any(_inside(cell, b) for b in self.valid):
                continue  # the accumulator alone: already the sum
            _sum_into(_view(self.acc, self.whole, cell), items)
        self.valid, self.held = [self.whole], []

    def _allocate(self) -> None:
        """The accumulator, valid nowhere yet: the tensor given to ``over`` where it can be."""
        if self.dest is not None and self.dest.dtype == self.dtype:
            self.acc = self.dest
        else:
            self.acc = torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _empty(self, box: Box) -> bool:
        return not any(_meets(box, b) for b in self._boxes())

    def _accumulator(self, box: Box, overwrite: bool) -> torch.Tensor:
        self._check_not_sole()
        region = tuple(slice(b0, b1) for b0, b1 in box)
        if overwrite:
            if not self._empty(box):
                raise ValueError("GradSum: overwriting a region that holds contributions")
            if self.acc is None and self.sole_dtype is not None and box == self.whole:
                self.acc = torch.empty(self.shape, dtype=self.sole_dtype, device=self.device)
            elif self.acc is None:
                self._allocate()
            self.valid.append(box)
            return self.acc[region]
        self._fold()
        return self.acc[region]


class _Part:
    """A region of a ``GradSum``, summed as a whole one is (``GradSum.part``)."""

    def __init__(self, whole: GradSum, box: Box):
        self.whole, self.box = whole, box
        self.shape = torch.Size(b1 - b0 for b0, b1 in box)
        self.dtype = whole.dtype

    def _within(self, index: tuple) -> Box:
        inner = _box(index, self.shape)
        return tuple((b0 + i0, b0 + i1) for (b0, _), (i0, i1) in zip(self.box, inner))

    def part(self, index: tuple) -> _Part:
        return _Part(self.whole, self._within(index))

    def add(self, t: torch.Tensor, index: tuple = ()) -> None:
        self.whole._add(t, self._within(index))

    def accumulator(self, overwrite: bool = False) -> torch.Tensor:
        return self.whole._accumulator(self.box, overwrite)

    @property
    def empty(self) -> bool:
        return self.whole._empty(self.box)


def _is_sum(x) -> bool:
    return isinstance(x, (GradSum, _Part))


def accumulators(dq, dk, dv, dkv_fresh: bool, dq_may_overwrite: bool = False):
    """For kernels that add into fp32 tensors in place: the tensors behind ``dq``, ``dk``, ``dv``
    (sums or tensors already), whether dK/dV are to be overwritten (an empty sum's are), and
    whether dq is (an empty sum's, where the kernel can write it over: ``dq_may_overwrite``)."""
    dq_fresh = False
    if _is_sum(dq):
        dq_fresh = dq_may_overwrite and dq.empty
        dq = dq.accumulator(overwrite=dq_fresh)
    if _is_sum(dk):
        dkv_fresh = dk.empty and dv.empty
        dk, dv = dk.accumulator(overwrite=dkv_fresh), dv.accumulator(overwrite=dkv_fresh)
    return dq, dk, dv, dkv_fresh, dq_fresh


def sums_over(dq, dk, dv, dkv_fresh: bool) -> tuple[list, list[GradSum]]:
    """Sums for ``dq``, ``dk``, ``dv`` as a caller gave them: its sums, or sums over its tensors
    (added to, or dK/dV written over with ``dkv_fresh``), and the latter, to ``flush`` after."""
    if _is_sum(dq):
        return [dq, dk, dv], []
    sums = [GradSum.over(dq), GradSum.over(dk, dkv_fresh), GradSum.over(dv, dkv_fresh)]
    return sums, sums
