"""Every rank of a ring must be given the same inputs where the ring shards them: a cheap check.

Each rank computes on its own tokens of the full inputs it was given, so ranks given different
inputs (each its own batch, as a data loader with a ``DistributedSampler`` over every rank gives)
compute wrong numbers, silently, and do not even agree with each other. So before a compiled graph
runs (on its first call, or on every call: the ``check_inputs`` option) each rank fingerprints the
graph inputs the ring shards (``plan_sequence``'s ``sequence_inputs``) and one small all-gather
brings every rank the whole table. Every rank compares the same table, so a mismatch raises the
same ``RingInputMismatchError`` on every rank, and none is left waiting in a collective.

A fingerprint is five int64s: a CRC of the input's name, shape and dtype, its number of elements,
and three sums of its elements' bits (plain, squared, and times their index) in wrapping integer
arithmetic. Integer sums do not depend on the order a reduction adds in, so the same tensor gives
every rank the same numbers; different tensors give the same ones only by a vanishing chance.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from ringcompile.errors import RingInputMismatchError
from ringcompile.group import all_gather_single

__all__ = ["CheckedInputs", "check_same_on_every_rank", "fingerprint"]

_WIDTH = 5  # int64s per fingerprint
_PER_GATHER = 8  # fingerprints per all-gather: one collective for all but unusual graphs
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x``'s five int64s, on its device."""
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    flat = (x.view(_BITS[x.element_size()]) if x.is_floating_point() else x).reshape(-1)
    flat = flat.to(torch.int64)
    ramp = torch.arange(1, flat.numel() + 1, device=flat.device)
    kind = zlib.crc32(f"{name} {tuple(x.shape)} {x.dtype}".encode())
    return torch.cat([torch.tensor([kind, x.numel()], device=flat.device),
                      torch.stack([flat.sum(), (flat * flat).sum(), (flat * ramp).sum()])])


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _difference(name: str, rows: torch.Tensor) -> str | None:
    """How one input's fingerprints ``(W, 5)`` differ across the ranks, or None if they agree."""
    holders: dict[tuple, list[int]] = {}
    for rank, row in enumerate(rows.tolist()):
        holders.setdefault(tuple(row), []).append(rank)
    if len(holders) == 1:
        return None
    what = "in shape or dtype" if len({row[:2] for row in holders}) > 1 else "in its values"
    groups = list(holders.values())
    held = [f"{_ranks(groups[0])} {'hold' if len(groups[0]) > 1 else 'holds'} one tensor"]
    held += [f"{_ranks(g)} another" for g in groups[1:]]
    return f"input {name} differs {what}: {', '.join(held)}"


def check_same_on_every_rank(inputs: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup,
                             when: str) -> None:  # fmt: skip
    """Raise ``RingInputMismatchError`` on every rank of ``group`` unless every rank was given the
    same ``inputs`` (``(name, tensor)`` pairs, in the same order on every rank)."""
    W = group.size()
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    rows = [fingerprint(t, name).to(device) for name, t in inputs]
    found: list[str] = []
    # The first all-gather carries every rank's count of inputs: ranks that compiled different
    # graphs all raise after it, so the rest (more than _PER_GATHER inputs) run on every rank.
    for start in range(0, max(len(rows), 1), _PER_GATHER):
        chunk = rows[start:start + _PER_GATHER]
        mine = torch.zeros(1 + _PER_GATHER * _WIDTH, dtype=torch.int64, device=device)
        mine[0] = len(rows)
        if chunk:
            mine[1:1 + len(chunk) * _WIDTH] = torch.cat(chunk)
        table = mine.new_empty(W * mine.numel())  # flat: gloo takes no other shape
        all_gather_single(table, mine, group=group)
        table = table.view(W, -1).cpu()
        counts = table[:, 0].tolist()
        if len(set(counts)) > 1:
            raise RingInputMismatchError(
                "backend='ring': the ranks of the ring compiled different graphs: they shard "
                + ", ".join(f"{n} input(s) on rank {r}" for r, n in enumerate(counts))
                + ". Every rank of the ring must run the same program on the same inputs."
            )
        for i, (name, _) in enumerate(inputs[start:start + _PER_GATHER]):
            difference = _difference(name, table[:, 1 + i * _WIDTH:1 + (i + 1) * _WIDTH])
            if difference:
                found.append(difference)
    if found:
        raise RingInputMismatchError(
            f"backend='ring': the ranks of the ring were given different inputs (checked {when}):\n"
            + "".join(f"  - {f}\n" for f in found)
            + "The ring shards these inputs along the sequence and each rank computes on its own "
            "tokens of the full tensor it was given, so every rank of the ring must be given the "
            "same full inputs: feed every rank of the ring the same batch. To combine with data "
            "parallelism, shard the data over the other dimension of a 2-D mesh (a "
            "DistributedSampler over the data-parallel ranks), never over the ring's ranks."
        )


class CheckedInputs:
    """A compiled graph that first checks that every rank of the ring was given the same inputs
    where the ring shards them: on its first call, or on every call."""

    def __init__(self, compiled, group: dist.ProcessGroup, inputs: list[tuple[int, str]],
                 every_call: bool):  # fmt: skip
        self.compiled, self.group, self.inputs = compiled, group, inputs  # (arg index, name)
        self.every_call = every_call
        self.pending = True

    def __call__(self, *args):
        if self.pending:
            when = "on every call" if self.every_call else "on the first call"
            check_same_on_every_rank([(name, args[i]) for i, name in self.inputs], self.group,
                                     when)  # fmt: skip
            self.pending = self.every_call  # not before: a call that raised is checked again
        return self.compiled(*args)
