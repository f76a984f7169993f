"""The process group a ring runs over: a ProcessGroup, a DeviceMesh dimension, or the world.

A ring may be smaller than the world: with a 2-D mesh ``(dp, cp)`` each ``cp`` row is a ring and
the ``dp`` rows hold different batches. The ring op names its group by ``group_name`` (a string a
custom op can carry) and resolves it back with ``resolve_group_name``.

Two mesh dims, ``mesh_dim=("cp_a2a", "cp_ring")``, make a ``TwoLevel`` group: an all-to-all over
heads along the first, a ring along the second. What shards, gathers and sums runs over the two
dims flattened into one group (``TwoLevel.whole``, what ``resolve_group`` returns for them).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from ringcompile.errors import RingWarning

__all__ = [
    "resolve_group",
    "resolve_two_level",
    "TwoLevel",
    "group_name_of",
    "resolve_group_name",
    "nccl_options",
    "all_gather_single",
    "warn_if_launched_without_group",
]

# The ring op's name for "no group: one process, plain attention".
SINGLE = ""

# torch 2.13 renamed all_gather_into_tensor (same arguments) and warns on the old name, which
# older torch has alone.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TwoLevel:
    """A context-parallel group in two levels: an all-to-all over heads among the ranks of
    ``heads`` (U of them, inside a node), a ring of R such head groups along ``ring``. ``whole``
    holds all U × R ranks, in the mesh's order: rank ``ring_rank * U + heads_rank``, or
    ``heads_rank * R + ring_rank`` where the heads dim comes first in the mesh
    (``heads_major``)."""

    whole: dist.ProcessGroup
    heads: dist.ProcessGroup
    ring: dist.ProcessGroup
    heads_major: bool

    def layout_name(self, name: str) -> str:
        """The ``SplitLayout`` name of ``name`` over the ring, split over each head group."""
        return f"{name}/{self.heads.size()}" + ("/heads-major" if self.heads_major else "")


_TWO_LEVELS: dict = {}


def resolve_two_level(group=None, mesh_dim=None) -> TwoLevel | None:
    """The ``TwoLevel`` group that ``group`` and a pair of mesh dims ``(heads, ring)`` name (or
    ``group`` itself); None for one dim."""
    if isinstance(group, TwoLevel):
        return group
    if isinstance(group, tuple):
        group, mesh_dim = group
    if not isinstance(mesh_dim, (tuple, list)):
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(group, DeviceMesh) or len(mesh_dim) != 2:
        raise ValueError(
            "two mesh dims (an all-to-all over heads, then a ring) name two dims of a DeviceMesh: "
            f"group=mesh, mesh_dim=('cp_a2a', 'cp_ring'); got group={type(group).__name__}, "
            f"mesh_dim={mesh_dim!r}"
        )
    key = (group, tuple(mesh_dim))
    if key not in _TWO_LEVELS:  # flattening makes a process group: once per mesh and dims
        _TWO_LEVELS[key] = _two_level(group, *mesh_dim)
    return _TWO_LEVELS[key]


def _two_level(mesh, heads_dim, ring_dim) -> TwoLevel:
    names = mesh.mesh_dim_names or ()
    index = [
        names.index(d) if isinstance(d, str) and d in names else d for d in (heads_dim, ring_dim)
    ]
    if not names or not all(isinstance(i, int) and 0 <= i < mesh.ndim for i in index) or (
            index[0] == index[1]):  # fmt: skip
        raise ValueError(
            f"mesh_dim={(heads_dim, ring_dim)!r} must name two different dims of the mesh, whose "
            f"dims are named {names or 'nothing (name them: init_device_mesh(..., mesh_dim_names=...))'}"
        )
    both = tuple(names[i] for i in sorted(index))
    sub = mesh[both]
    # the flattened group numbers its ranks in increasing order; the layout numbers them in the
    # mesh's row-major order: they agree where the mesh lists its ranks in increasing order (what
    # every rank of the group sees alike, so all of them raise together)
    order = sub.mesh.flatten().tolist()
    if order != sorted(order):
        raise ValueError(
            f"the mesh's dims {both} list their ranks {order} out of order: build the mesh as "
            "init_device_mesh does, ranks in row-major order"
        )
    heads, ring = mesh.get_group(index[0]), mesh.get_group(index[1])
    return TwoLevel(sub._flatten().get_group(), heads, ring, heads_major=index[0] < index[1])


def resolve_group(group=None, mesh_dim: int | str | None = None) -> dist.ProcessGroup | None:
    """The ProcessGroup for ``group``: None (the world, or nothing if torch.distributed is not
    initialised), a ProcessGroup, a DeviceMesh (with ``mesh_dim`` when it has several dims; two of
    them, a ``TwoLevel`` group's, give its ranks as one group), a ``(DeviceMesh, dim)`` pair or a
    ``TwoLevel``."""
    two = resolve_two_level(group, mesh_dim)
    if two is not None:
        return two.whole
    if isinstance(group, tuple):
        group, mesh_dim = group
    if group is None:
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim > 1:
            raise ValueError(
                f"a {group.ndim}-D DeviceMesh needs mesh_dim: which of its dims "
                f"{group.mesh_dim_names or tuple(range(group.ndim))} is the ring"
            )
        return group.get_group(mesh_dim if mesh_dim is not None else 0)
    raise TypeError(
        f"group must be None, a ProcessGroup, a DeviceMesh or (DeviceMesh, dim); got {type(group)}"
    )


def warn_if_launched_without_group() -> None:
    """Warn (once per process) where the launcher started several processes (``WORLD_SIZE`` > 1,
    as ``torchrun`` sets) but no process group exists: each process would run the whole model
    alone, silently."""
    world = os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1 and not (dist.is_available() and dist.is_initialized()):
        _warn_launched_without_group(int(world))


@functools.cache  # once per process
def _warn_launched_without_group(world: int) -> None:
    warnings.warn(
        f"backend='ring': WORLD_SIZE={world} says this process is one of {world}, but "
        "torch.distributed is not initialised, so it runs the whole model alone: nothing is "
        "sharded, every process computes every token. Call torch.distributed."
        'init_process_group() on every process (under torchrun: dist.init_process_group("nccl") '
        'on GPUs, "gloo" on CPUs) before the compiled model\'s first call.',
        RingWarning,
        stacklevel=2,
    )


def group_name_of(pg: dist.ProcessGroup | None) -> str:
    if pg is None or pg.size() == 1:
        return SINGLE
    return pg.group_name


def resolve_group_name(name: str) -> dist.ProcessGroup | None:
    return None if name == SINGLE else _resolve_process_group(name)


def nccl_options(high_priority: bool = True):
    """Options for ``dist.init_process_group("nccl", pg_options=...)``. High-priority NCCL
    streams let the ring's sends and its agreement check take SMs as soon as they free up,
    instead of queueing behind a running attention kernel's programs."""
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = high_priority
    return options
