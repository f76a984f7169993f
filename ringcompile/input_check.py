"""Every rank of a ring must be given the same inputs where the ring shards them: a cheap check.

Each rank computes on its own tokens of the full inputs it was given, so ranks given different
inputs (each its own batch, as a data loader with a ``DistributedSampler`` over every rank gives)
compute wrong numbers, silently, and do not even agree with each other. So before a compiled graph
runs (on its first call, or on every call: the ``check_inputs`` option) each rank fingerprints the
graph inputs the ring shards (``plan_sequence``'s ``sequence_inputs``) and one small all-gather
brings every rank the whole table. Every rank compares the same table, so a mismatch raises the
same ``RingInputMismatchError`` on every rank, and none is left waiting in a collective.

Every call of such a graph, on every rank, starts with the same small all-gather: a header saying
which graph it runs (a signature of its input shapes and of the collectives it issues), the shapes of the inputs it
shards, and whether its check is due. Ranks that run different graphs (a length that changed on
one rank only, so that it compiled a new graph while the others reuse theirs) would otherwise
issue different collectives, which crashes gloo and hangs NCCL; after the header they all raise
``RingInputMismatchError``, naming the inputs and each rank's shapes. The check runs on every rank
where any rank's is due.

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
        flat = bits[start : start + _CHUNK].to(torch.int64)
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


def _device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take their tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(
    rows: list[torch.Tensor], head: list[int], group: dist.ProcessGroup, device: torch.device
) -> torch.Tensor:
    """Every rank's ``head`` and up to ``_PER_GATHER`` fingerprints, as a (W, n) CPU table; one
    all-gather of one size whatever a rank holds."""
    mine = torch.zeros(len(head) + _PER_GATHER * _WIDTH, dtype=torch.int64, device=device)
    mine[: len(head)] = torch.tensor(head, dtype=torch.int64)
    if rows:
        mine[len(head) : len(head) + len(rows) * _WIDTH] = torch.cat(rows)
    table = mine.new_empty(group.size() * mine.numel())  # flat: gloo takes no other shape
    all_gather_single(table, mine, group=group)
    return table.view(group.size(), -1).cpu()


def _differences(names: list[str], table: torch.Tensor, kind: str) -> list[str]:
    return [
        d
        for i, name in enumerate(names)
        if (d := _difference(f"{kind} {name}", table[:, i * _WIDTH : (i + 1) * _WIDTH]))
    ]


def check_same_on_every_rank(
    inputs: list[tuple[str, torch.Tensor]],
    group: dist.ProcessGroup,
    when: str,
    states: list[tuple[str, torch.Tensor]] = (),
) -> None:
    """Raise ``RingInputMismatchError`` on every rank of ``group`` unless every rank was given the
    same ``inputs`` (``(name, tensor)`` pairs, in the same order on every rank) and holds the same
    ``states`` (the model's parameters and buffers)."""
    device = _device(group)
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
        table = _gather_rows(rows[start : start + _PER_GATHER], head, group, device)
        if start == 0:
            counts = table[:, :2].tolist()
            if len({tuple(c) for c in counts}) > 1:
                raise RingInputMismatchError(
                    "backend='ring': the ranks of the ring compiled different graphs: "
                    + ", ".join(
                        f"{n} sharded input(s) and {m} parameter(s) or buffer(s) on rank {r}"
                        for r, (n, m) in enumerate(counts)
                    )
                    + ". Every rank of the ring must run the same program on the same inputs."
                )
            states_differ = len({tuple(r) for r in table[:, 2 : 2 + _WIDTH].tolist()}) > 1
            table = table[:, 2 + _WIDTH :]
        found += _differences([n for n, _ in inputs[start : start + _PER_GATHER]], table, "input")
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
            chunk = states[start : start + _PER_GATHER]
            table = _gather_rows([fingerprint(t, n).to(device) for n, t in chunk], [], group,
                                 device)  # fmt: skip
            found += _differences([n for n, _ in chunk], table, "parameter or buffer")
        shown = found[:_SHOWN] + (
            [f"and {len(found) - _SHOWN} more"] if len(found) > _SHOWN else []
        )
        raise RingInputMismatchError(
            f"backend='ring': the ranks of the ring hold different parameters or buffers (checked "
            f"{when}):\n"
            + "".join(f"  - {f}\n" for f in shown)
            + "Each rank computes with its own copy of the model on its tokens, so the copies must "
            "be equal: build the model the same way on every rank (the same torch.manual_seed "
            "before building it, or the same checkpoint loaded on every rank)."
        )


_HEADER_INPUTS = 4  # sharded inputs whose shapes a header carries
_HEADER_DIMS = 4  # dims of each (the last ones)


def _header(signature: int, due: bool, states_due: bool,
            inputs: list[tuple[str, torch.Tensor]]) -> list[int]:  # fmt: skip
    """The call header: [signature, due, states due, then per input: rank, its last dims]."""
    head = [signature, int(due), int(states_due)]
    for i in range(_HEADER_INPUTS):
        shape = tuple(inputs[i][1].shape) if i < len(inputs) else ()
        dims = list(shape[-_HEADER_DIMS:])
        head += [len(shape) if i < len(inputs) else -1] + [0] * (_HEADER_DIMS - len(dims)) + dims
    return head


def _shapes(row: list[int], names: list[str]) -> str:
    """The inputs' shapes a header row holds (the leading dims of long shapes as "...")."""
    shown = []
    for i, name in enumerate(names[:_HEADER_INPUTS]):
        rank, *dims = row[3 + i * (1 + _HEADER_DIMS) : 3 + (i + 1) * (1 + _HEADER_DIMS)]
        if rank < 0:
            shown.append(f"{name} absent")
            continue
        kept = dims[_HEADER_DIMS - min(rank, _HEADER_DIMS) :]
        shown.append(f"{name} {'(..., ' if rank > _HEADER_DIMS else '('}"
                     f"{', '.join(map(str, kept))}{',' if rank == 1 else ''})")  # fmt: skip
    return ", ".join(shown) or "no sharded inputs"


class CheckedInputs:
    """A compiled graph whose every call first exchanges the call header (the same collective on
    every rank, whatever graph it runs), then, where a check is due on any rank, checks that every
    rank of the ring was given the same inputs where the ring shards them (on the first call, or
    on every call) and, on the first call, that every rank holds the same parameters and
    buffers."""

    def __init__(self, compiled, group: dist.ProcessGroup, inputs: list[tuple[int, str]],
                 states: list[tuple[int, str]], every_call: bool, signature: int):  # fmt: skip
        self.compiled, self.group = compiled, group
        self.inputs, self.states = inputs, states  # (arg index, name)
        self.every_call = every_call
        self.signature = signature
        self.pending, self.states_pending = True, True

    def __call__(self, *args):
        inputs = [(name, args[i]) for i, name in self.inputs]
        device = _device(self.group)
        table = _gather_rows([], _header(self.signature, self.pending, self.states_pending, inputs),
                             self.group, device).tolist()  # fmt: skip
        if len({row[0] for row in table}) > 1:
            names = [name for _, name in self.inputs]
            raise RingInputMismatchError(
                "backend='ring': the ranks of the ring run different compiled graphs, so they "
                "would issue different collectives: "
                + "; ".join(f"rank {r}: {_shapes(row, names)}" for r, row in enumerate(table))
                + ". Every rank of the ring must run the same program on the same inputs (the "
                "same batch, at the same length, on every rank of the ring)."
            )
        if any(row[1] for row in table):
            when = "on every call" if self.every_call else "on the first call"
            states_due = any(row[2] for row in table)
            states = [(n, args[i]) for i, n in self.states] if states_due else []
            check_same_on_every_rank(inputs, self.group, when, states)
            # not before: a call that raised is checked again
            self.pending, self.states_pending = self.every_call, False
        return self.compiled(*args)
