"""The process group a ring runs over: a ProcessGroup, a DeviceMesh dimension, or the world.

A ring may be smaller than the world: with a 2-D mesh ``(dp, cp)`` each ``cp`` row is a ring and
the ``dp`` rows hold different batches. The ring op names its group by ``group_name`` (a string a
custom op can carry) and resolves it back with ``resolve_group_name``.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from ringcompile.errors import RingWarning

__all__ = [
    "resolve_group",
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


def resolve_group(group=None, mesh_dim: int | str | None = None) -> dist.ProcessGroup | None:
    """The ProcessGroup for ``group``: None (the world, or nothing if torch.distributed is not
    initialised), a ProcessGroup, a DeviceMesh (with ``mesh_dim`` when it has several dims) or a
    ``(DeviceMesh, dim)`` pair."""
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
