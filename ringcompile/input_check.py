"""Every rank of a ring must be given the same inputs where the ring shards them: a cheap check.

Each rank computes on its own tokens of the full inputs it was given, so ranks given different
inputs (each its own batch, as a data loader with a ``DistributedSampler`` over every rank gives)
compute wrong numbers, silently, and do not even agree with each other. So before a compiled graph
runs (on its first call, or on every call: the ``check_inputs`` option) each rank fingerprints the
graph inputs the ring shards (``plan_sequence``'s ``sequence_inputs``) and one small all-gather
brings every rank the whole table. Every rank compares the same table, so a mismatch raises the
same ``RingInputMismatchError`` on every rank, and none is left waiting in a collective.

The model's parameters and buffers the graph reads are compared too, on each graph's first check:
every rank computes with its own copy of the model, so copies built from different seeds compute
wrong numbers as silently as different batches. They ride the first all-gather as one combined
fingerprint; only where that differs does a second round name the tensors that differ.

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
_SHOWN = 8  # differing parameters or buffers named in the error
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements summed at a time: a large weight needs no int64 copy of its size


def fingerprint(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x``'s five int64s, on its device."""
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    bits = (x.view(_BITS[x.element_size()]) if x.is_floating_point() else x).reshape(-1)
    sums = torch.zeros(3, dtype=torch.int64, device=x.device)
    for start in range(0, bits.numel(), _CHUNK):
        flat = bits[start:start + _CHUNK].to(torch.int64)
        ramp = torch.arange(start + 1, start + flat.numel() + 1, device=flat.device)
        sums += torch.stack([flat.sum(), (flat * flat).sum(), (flat * ramp).sum()])
    kind = zlib.crc32(f"{name} {tuple(x.shape)} {x.dtype}".encode())
    return torch.cat([torch.tensor([kind, x.numel()], device=x.device), sums])


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
    return f"{name} differs {what}: {', '.join(held)}"


def _gather_rows(rows: list[torch.Tensor], head: list[int], group: dist.ProcessGroup,
                 device: torch.device) -> torch.Tensor:
    """Every rank's ``head`` and up to ``_PER_GATHER`` fingerprints, as a (W, n) CPU table; one
    all-gather of one size whatever a rank holds."""
    mine = torch.zeros(len(head) + _PER_GATHER * _WIDTH, dtype=torch.int64, device=device)
    mine[:len(head)] = torch.tensor(head, dtype=torch.int64)
    if rows:
        mine[len(head):len(head) + len(rows) * _WIDTH] = torch.cat(rows)
    table = mine.new_empty(group.size() * mine.numel())  # flat: gloo takes no other shape
    all_gather_single(table, mine, group=group)
    return table.view(group.size(), -1).cpu()


def _differences(names: list[str], table: torch.Tensor, kind: str) -> list[str]:
    return [d for i, name in enumerate(names)
            if (d := _difference(f"{kind} {name}", table[:, i * _WIDTH:(i + 1) * _WIDTH]))]


def check_same_on_every_rank(inputs: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup,
                             when: str, states: list[tuple[str, torch.Tensor]] = ()) -> None:
    """Raise ``RingInputMismatchError`` on every rank of ``group`` unless every rank was given the
    same ``inputs`` (``(name, tensor)`` pairs, in the same order on every rank) and holds the same
    ``states`` (the model's parameters and buffers)."""
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    rows = [fingerprint(t, name).to(device) for name, t in inputs]
    combined = torch.zeros(_WIDTH, dtype=torch.int64, device=device)
    for i, (name, t) in enumerate(states):  # order-sensitive: each state its own odd factor
        combined += fingerprint(t, name).to(device) * (2 * i + 1)
    found: list[str] = []
    # The first all-gather carries every rank's counts and its states' combined fingerprint:
    # ranks that compiled different graphs all raise after it, so the rest (more than
    # _PER_GATHER inputs, the states' names) run on every rank.
    for start in range(0, max(len(rows), 1), _PER_GATHER):
        head = [len(rows), len(states), *combined.tolist()] if start == 0 else []
        table = _gather_rows(rows[start:start + _PER_GATHER], head, group, device)
        if start == 0:
            counts = table[:, :2].tolist()
            if len({tuple(c) for c in counts}) > 1:
                raise RingInputMismatchError(
                    "backend='ring': the ranks of the ring compiled different graphs: "
                    + ", ".join(f"{n} sharded input(s) and {m} parameter(s) or buffer(s) on rank "
                                f"{r}" for r, (n, m) in enumerate(counts))
                    + ". Every rank of the ring must run the same program on the same inputs."
                )
            states_differ = len({tuple(r) for r in table[:, 2:2 + _WIDTH].tolist()}) > 1
            table = table[:, 2 + _WIDTH:]
        found += _differences([n for n, _ in inputs[start:start + _PER_GATHER]], table, "input")
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
    if states_differ:  # every rank saw it in the same table: every rank names them
        for start in range(0, len(states), _PER_GATHER):
            chunk = states[start:start + _PER_GATHER]
            table = _gather_rows([fingerprint(t, n).to(device) for n, t in chunk], [], group,
                                 device)  # fmt: skip
            found += _differences([n for n, _ in chunk], table, "parameter or buffer")
        shown = found[:_SHOWN] + ([f"and {len(found) - _SHOWN} more"] if len(found) > _SHOWN else [])
        raise RingInputMismatchError(
            f"backend='ring': the ranks of the ring hold different parameters or buffers (checked "
            f"{when}):\n" + "".join(f"  - {f}\n" for f in shown)
            + "Each rank computes with its own copy of the model on its tokens, so the copies must "
            "be equal: build the model the same way on every rank (the same torch.manual_seed "
            "before building it, or the same checkpoint loaded on every rank)."
        )


class CheckedInputs:
    """A compiled graph that first checks that every rank of the ring was given the same inputs
    where the ring shards them (on its first call, or on every call) and, on its first call, that
    every rank holds the same parameters and buffers."""

    def __init__(self, compiled, group: dist.ProcessGroup, inputs: list[tuple[int, str]],
                 states: list[tuple[int, str]], every_call: bool):  # fmt: skip
        self.compiled, self.group = compiled, group
        self.inputs, self.states = inputs, states  # (arg index, name)
        self.every_call = every_call
        self.pending, self.states_pending = True, True

    def __call__(self, *args):
        if self.pending:
            when = "on every call" if self.every_call else "on the first call"
            states = [(n, args[i]) for i, n in self.states] if self.states_pending else []
            check_same_on_every_rank([(name, args[i]) for i, name in self.inputs], self.group,
                                     when, states)  # fmt: skip
            # not before: a call that raised is checked again
            self.pending, self.states_pending = self.every_call, False
        return self.compiled(*args)
