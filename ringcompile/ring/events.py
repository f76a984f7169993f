"""What the ring ops did, counted for whoever listens (tests, benchmarks).

The ops report events (``record``); nothing is kept unless a listener is installed with
``count_ring_events()``, so the hot path does no bookkeeping of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["RingCounts", "count_ring_events", "record"]


@dataclass
class RingCounts:
    """Counts of what this process's ring ops did while the listener was installed."""

    forward_calls: int = 0
    backward_calls: int = 0
    kv_blocks_sent: int = 0  # K/V blocks this rank sent (forward and backward)
    dkv_blocks_sent: int = 0  # dK/dV accumulators this rank sent
    steps_computed: int = 0
    steps_skipped: int = 0
    idle_padding_dropped: int = 0  # calls (forward or backward) whose key validity hid nothing
    all_to_alls: int = 0  # Ulysses' all-to-alls (``ringcompile.ulysses``), facts' included


_listeners: list[RingCounts] = []


def record(event: str, n: int = 1) -> None:
    for counts in _listeners:
        setattr(counts, event, getattr(counts, event) + n)


@contextlib.contextmanager
def count_ring_events() -> Iterator[RingCounts]:
    """Counts the ring's events inside the block: ``with count_ring_events() as counts: ...``."""
    counts = RingCounts()
    _listeners.append(counts)
    try:
        yield counts
    finally:
        _listeners.remove(counts)
