"""Work per rank: how many (query, key) pairs each rank's queries see in each ring step, for one
call's data, and how evenly a layout spreads them.

The plan (``plan.py``) knows the position rules only. Packed documents and key padding are data:
how well a layout balances them depends on where the documents fall. A rank's time in a step is
its block's pairs (the kernels skip what the mask hides), and each step waits for the slowest
rank, so two numbers tell a layout's balance:

- ``imbalance``: the most pairs any rank computes over the whole call, over the mean;
- ``step_bound``: the slowest rank's pairs summed over the steps, over the mean rank's whole
  call: what the ring's critical path costs against perfect balance (>= ``imbalance``).

Counting never builds S x S: with keys sorted by (row, document, position), the keys a query sees
are one interval (the rules give a window of positions, a document is one run of the sort), so two
binary searches a query count them (a prefix, or-ed with the rules, is a second interval).

``explain`` listens (``recording_balance``): the ring's forward then all-gathers the facts of a
call that has document ids or key padding and records its balance (a call under position rules
alone is balanced as its layout is, whatever the data). Outside it, nothing is counted and
nothing is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ringcompile.layout import Layout
from ringcompile.masks import PositionRules

__all__ = ["Balance", "pairs_per_step", "recording_balance", "listening", "record"]


def pairs_per_step(layout: Layout, rules: PositionRules,
                   document_ids: torch.Tensor | None = None,
                   key_valid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``pairs[r, s]``: the (query, key) pairs rank ``r``'s queries see among the keys of rank
    ``(r - s) % W``, summed over batch rows; (W, W) int64. ``document_ids`` and ``key_valid``:
    (B, padded_len) in sharded order (the ranks' local tokens one after the other), None: one
    document, every key valid. Queries at layout padding are left out (their outputs are dropped).
    """
    W, n, P = layout.world_size, layout.local_len, layout.padded_len
    facts = [t for t in (document_ids, key_valid) if t is not None]
    B = facts[0].shape[0] if facts else 1
    doc = (document_ids.to(torch.int64) if document_ids is not None
           else torch.zeros((B, P), dtype=torch.int64))  # fmt: skip
    valid = key_valid.bool() if key_valid is not None else torch.ones((B, P), dtype=torch.bool)
    # (row, document) as one dense group number: keys of one group are a run once sorted
    _, group = torch.unique(doc + torch.arange(B)[:, None] * (doc.max() - doc.min() + 1),
                            return_inverse=True)  # fmt: skip
    span = P + 2  # positions shifted by one: slots 0 and P + 1 of a group hold no key
    pos = [layout.positions(r) for r in range(W)]
    pairs = torch.zeros((W, W), dtype=torch.int64)
    for r in range(W):
        q_pos = pos[r]
        real = q_pos < layout.seq_len
        lo, hi = rules.bounds(q_pos)
        for s in range(W):
            src = (r - s) % W
            k_pos, keys = pos[src], slice(src * n, (src + 1) * n)
            seen = valid[:, keys] & (k_pos < layout.seq_len)
            k_code = torch.sort((group[:, keys] * span + k_pos + 1)[seen]).values
            q_group = group[:, r * n : (r + 1) * n][:, real] * span

            def between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                """Each query's keys of its group at positions in [a, b]."""
                first = torch.searchsorted(k_code, q_group + (a[real] + 1).clamp(0, span - 1))
                last = torch.searchsorted(k_code, q_group + (b[real] + 1).clamp(0, span - 1),
                                          right=True)  # fmt: skip
                return (last - first).clamp(min=0)

            count = between(lo, hi)
            if rules.prefix > 0:  # or-ed: the prefix's keys, less those counted already
                start, end = torch.zeros_like(lo), torch.full_like(hi, rules.prefix - 1)
                count = (count + between(start, end)
                         - between(torch.maximum(lo, start), torch.minimum(hi, end)))  # fmt: skip
            pairs[r, s] = count.sum()
    return pairs


@dataclass(frozen=True)
class Balance:
    """One call's work per rank and step (``pairs_per_step``), in a layout."""

    layout: str
    pairs: torch.Tensor  # (W, W) int64

    @property
    def per_rank(self) -> torch.Tensor:
        return self.pairs.sum(1)

    @property
    def imbalance(self) -> float:
        """The busiest rank's pairs over the mean rank's (1.0: even)."""
        per_rank = self.per_rank.double()
        return float(per_rank.max() / per_rank.mean()) if per_rank.sum() else 1.0

    @property
    def step_bound(self) -> float:
        """Each step's slowest rank, summed, over the mean rank's whole call (1.0: even)."""
        mean = self.per_rank.double().mean()
        return float(self.pairs.amax(0).sum() / mean) if mean else 1.0

    def __str__(self) -> str:
        busiest = int(self.per_rank.argmax())
        return (f"{self.layout} layout: pairs per rank max / mean {self.imbalance:.3f} (rank "
                f"{busiest}: {_count(int(self.per_rank[busiest]))} of "
                f"{_count(int(self.pairs.sum()))}); each step's slowest rank, summed / mean "
                f"{self.step_bound:.3f}")  # fmt: skip


def _count(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# explain's record: one line per distinct call's balance, with how many calls had it
_log: dict[str, int] | None = None


@contextlib.contextmanager
def recording_balance() -> Iterator[dict[str, int]]:
    """Within it, each ring call's balance is recorded: ``{line: number of calls}``."""
    global _log
    outer, _log = _log, {}
    try:
        yield _log
    finally:
        _log = outer


def listening() -> bool:
    return _log is not None


def record(ring, layout: Layout, mask, facts: torch.Tensor) -> None:
    """Record a ring call's balance: ``facts`` (2, B, S_local), this rank's document ids and key
    validity as the ring sends them (``RankCall.facts``), are all-gathered first (every rank
    records, so every rank issues the gather)."""
    _, B, n = facts.shape
    table = ring.start_agreement([], [], facts.device, extra=facts)()
    every = table.view(ring.size, 2, B, n).permute(1, 2, 0, 3).reshape(2, B, ring.size * n)
    doc = every[0] if mask.document_ids is not None else None
    valid = every[1] if mask.key_padding_mask is not None else None
    parts = [str(mask.rules)] + [name for name, t in (("documents", doc), ("key padding", valid))
                                 if t is not None]  # fmt: skip
    balance = Balance(layout.name, pairs_per_step(layout, mask.rules, doc, valid))
    line = f"{', '.join(parts)} over {ring.size} ranks, {balance}"
    _log[line] = _log.get(line, 0) + 1
