"""How the ring talks: a small ``Ring`` interface, over a process group or over nothing.

The schedules (``forward.py``, ``backward.py``) only send blocks to a peer, receive from another,
agree on a few integers and sum a few tensors; they do it through this interface, so the same
schedule runs over NCCL or gloo (``GroupRing``) and with no communication at all (``LocalRing``:
one rank of a ring computed alone, as the benchmarks and the ring simulator time it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from ringcompile.group import all_gather_single

__all__ = ["GroupRing", "LocalRing", "Ring", "wait_all"]

# A started agreement: waiting for it raises on every rank if the ranks differ, and gives every
# rank's device-computed extras (W, n) on the host (None without).
Verify = Callable[[], "torch.Tensor | None"]


class Ring(Protocol):
    rank: int
    size: int

    def peer(self, offset: int) -> int:
        """The rank ``offset`` steps along the ring."""

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], to: int,
                 frm: int) -> list:  # fmt: skip
        """Start sending ``send`` to ``to`` and receiving ``recv`` from ``frm``; ``wait_all``
        of the result completes both."""

    @property
    def alone(self) -> bool:
        """Whether no other process takes part in an agreement (what this rank says is every
        rank's answer)."""

    def start_agreement(self, meta: list[int], what: list[str], device: torch.device,
                        extra: torch.Tensor | None = None,
                        ready: torch.cuda.Event | None = None) -> Verify:  # fmt: skip
        """Start comparing every rank's ``meta`` (named by ``what``); ``extra``, int64 values
        on the device that ranks may differ in, is gathered along (``ready``: an event after
        which it holds them; None: the current point of the stream). Returns the wait."""

    def all_reduce(self, flat: torch.Tensor) -> None:
        """Sum ``flat`` over the ring in place."""


def wait_all(works) -> None:
    for w in works or ():
        w.wait()


class GroupRing:
    """The ring of a ``torch.distributed`` process group (rank r sends to r + 1)."""

    def __init__(self, pg: dist.ProcessGroup):
        self.pg = pg
        self.size = pg.size()
        self.rank = pg.rank()

    @property
    def alone(self) -> bool:
        return self.size == 1

    def peer(self, offset: int) -> int:
        return (self.rank + offset) % self.size

    def exchange(self, send, recv, to, frm):
        ops = [dist.P2POp(dist.isend, t, group=self.pg, group_peer=to) for t in send]
        ops += [dist.P2POp(dist.irecv, t, group=self.pg, group_peer=frm) for t in recv]
        return dist.batch_isend_irecv(ops)

    def start_agreement(self, meta, what, device, extra=None, ready=None):
        """Waiting later lets the GPU work meanwhile: the host waits for the all-gather alone, not
        for the kernels queued before or after it (with ``extra``, also for the work before
        ``ready``)."""
        nccl = dist.get_backend(self.pg) == "nccl"
        mine = torch.tensor(meta, dtype=torch.int64)
        n_extra = 0 if extra is None else extra.numel()
        if extra is not None and nccl and ready is None:
            ready = record_event(extra)
        ready = ready if nccl else None
        # On NCCL, issued from the side stream: NCCL orders a collective after the work queued on
        # the issuing stream, which on the current stream is everything queued so far (calls back
        # to back: the previous call's whole backward), and the host would wait for all of it.
        side = torch.cuda.stream(side_stream(device)) if nccl else contextlib.nullcontext()
        with side:
            if nccl:
                mine = mine.to(device, non_blocking=True)
            if extra is not None:
                if ready is not None:
                    side_stream(device).wait_event(ready)
                    extra.record_stream(side_stream(device))
                mine = torch.cat([mine, extra.reshape(-1)])
            table = mine.new_empty(self.size * mine.numel())  # flat: gloo takes no other shape
            work = all_gather_single(table, mine, group=self.pg, async_op=True)

        def verify() -> torch.Tensor | None:
            if nccl:
                # A copy, no kernel: a kernel would queue behind the attention kernel's programs.
                with torch.cuda.stream(side_stream(device)):
                    work.wait()
                    host = table.cpu()
            else:
                work.wait()
                host = table
            host = host.view(self.size, len(meta) + n_extra)
            raise_on_disagreement(host[:, : len(meta)], what)
            return host[:, len(meta) :] if extra is not None else None

        return verify

    def all_reduce(self, flat):
        dist.all_reduce(flat, group=self.pg)


class LocalRing:
    """Rank ``rank`` of a ring of ``size`` that sends nothing: what it sends comes straight back
    as what it receives (a step's keys are its own, with their facts; positions, from the layout,
    are the source rank's), and sums over the ring are this rank's alone. Exact for a ring of
    one; for more, a rank's schedule and kernels as the ring runs them, without the transfers.

    ``agree_over``: a process group of ``size`` ranks to hold the agreement over (its one small
    all-gather), so that what the ring decides from every rank's facts (dropping idle key
    padding) is decided as in the ring; None: every rank is taken to agree with this one."""

    def __init__(self, rank: int = 0, size: int = 1, agree_over: dist.ProcessGroup | None = None):
        self.rank, self.size = rank, size
        self._agreement = GroupRing(agree_over) if agree_over is not None else None

    @property
    def alone(self) -> bool:
        return self._agreement is None

    def peer(self, offset: int) -> int:
        return (self.rank + offset) % self.size

    def exchange(self, send, recv, to, frm):
        for r, s in zip(recv, send):
            r.copy_(s)
        return []

    def start_agreement(self, meta, what, device, extra=None, ready=None):
        if self._agreement is not None:
            return self._agreement.start_agreement(meta, what, device, extra, ready)
        if extra is None:
            return lambda: None
        return lambda: extra.reshape(1, -1).expand(self.size, -1).cpu()

    def all_reduce(self, flat):
        pass


def raise_on_disagreement(table: torch.Tensor, what: list[str]) -> None:
    """Raise, naming each value and every rank's, if the rows of ``table`` (W, len(what))
    differ."""
    bad = (table != table[0]).any(0)
    if bad.any():
        rows = ", ".join(
            f"{what[i]}: " + " / ".join(f"rank {r}={int(table[r, i])}" for r in range(len(table)))
            for i in bad.nonzero().flatten().tolist()
        )
        raise ValueError(
            "ring_attention: ranks of the ring disagree on "
            + rows
            + ". Every rank must call it with the same shapes and options (shard the sequence "
            "with one Layout so every rank holds the same number of tokens)."
        )


def token_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (B, H, S, D) is laid out (B, S, H, D), as a model's projections give it
    (``x.view(B, S, H, D).transpose(1, 2)``), and not contiguous (B, H, S, D)."""
    return t.dim() == 4 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous()


def on_the_wire(t: torch.Tensor) -> torch.Tensor:
    """A contiguous view of ``t``'s memory, which sends and receives take: ``t`` itself, or a
    token-major tensor as (B, S, H, D). Both ends of an exchange must hold the same layout."""
    return t.transpose(1, 2) if token_major(t) else t


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=-1)


def record_event(t: torch.Tensor) -> torch.cuda.Event | None:
    """An event at the current point of ``t``'s stream (None off CUDA: gloo is synchronous)."""
    if not t.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@contextlib.contextmanager
def issued_after(event: torch.cuda.Event | None, device: torch.device):
    """Issue collectives from a side stream that has waited for ``event`` only, so they depend on
    the work before it and not on kernels queued since."""
    if event is None:
        yield
        return
    stream = side_stream(device)
    stream.wait_event(event)
    with torch.cuda.stream(stream):
        yield
