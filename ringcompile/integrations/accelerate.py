"""accelerate on the ring: ``RingAccelerator`` prepares a model and its data loaders so that the
ranks of a ring share their batches and data parallelism runs across rings only.

    accelerator = RingAccelerator(ring_options={"compiler": "inductor"})  # the ring: every process
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

``ring_options`` are the backend's options (docs/backend.md); ``group`` and ``mesh_dim`` among
them name the ring. A ring of every process leaves one data-parallel rank; a smaller ring needs the
world as a 2-D DeviceMesh ``(data parallel, ring)``, with ``mesh_dim`` the ring's dim. What
``prepare`` does differently from ``Accelerator``'s:

- a model: every process takes rank 0's weights, its ``forward`` is compiled with
  ``backend="ring"`` and ``ring_options``, and it is wrapped in DDP over the data-parallel group
  only (no DDP with one data-parallel rank). The backend sums each parameter's gradient over the
  ring once; a DDP over the ring's ranks would reduce it a second time;
- a data loader: batches are sharded by data-parallel rank, so the ranks of a ring draw the same
  ones (accelerate shards them by process);
- a scheduler: stepped once per data-parallel rank at each optimizer step (accelerate steps it once
  per process, each process having drawn batches of its own).

``gather_for_metrics`` keeps one copy of each ring's values (it gathers over the data-parallel
group); ``gather`` and ``reduce`` still span every process, so a count gathered with them counts a
ring's batch once per rank of the ring.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType, DynamoBackend, recursively_apply
from torch.nn.parallel import DistributedDataParallel

import ringcompile  # noqa: F401  (registers backend="ring" when run from a checkout)
from ringcompile.errors import RingCompileError
from ringcompile.group import all_gather_single, resolve_group

__all__ = ["RingAccelerator", "RingGroups", "refuse_parallelism_config"]


@dataclass(frozen=True)
class RingGroups:
    """This process's ring and the data-parallel group across rings (None where there is none)."""

    ring: dist.ProcessGroup | None
    ring_size: int
    dp: dist.ProcessGroup | None
    dp_size: int
    dp_rank: int

    @classmethod
    def from_options(cls, options: dict) -> RingGroups:
        """The groups that the backend's ``group`` and ``mesh_dim`` options name."""
        group, mesh_dim = options.get("group"), options.get("mesh_dim")
        if isinstance(group, tuple):
            group, mesh_dim = group
        if not (dist.is_available() and dist.is_initialized()):
            world = os.environ.get("WORLD_SIZE", "1")
            if world.isdigit() and int(world) > 1:
                raise RingCompileError(
                    f"WORLD_SIZE={world} says this process is one of {world}, but "
                    "torch.distributed is not initialised, so each process would train alone. "
                    "Start the processes with torchrun or accelerate launch (accelerate then "
                    "initialises it), or call torch.distributed.init_process_group() on every "
                    'process first ("nccl" on GPUs, "gloo" on CPUs).'
                )
            return cls(None, 1, None, 1, 0)
        try:
            ring = resolve_group(group, mesh_dim)
        except (TypeError, ValueError) as e:
            raise RingCompileError(f"ring_options: {e}") from None
        world = dist.get_world_size()
        if ring.size() == world:
            return cls(ring, world, None, 1, 0)
        from torch.distributed.device_mesh import DeviceMesh

        if not (isinstance(group, DeviceMesh) and group.ndim == 2 and group.size() == world):
            raise RingCompileError(
                f"a ring of {ring.size()} ranks in a world of {world} needs the world as a 2-D "
                "DeviceMesh (data parallel, ring), which says which ranks share batches: "
                f"ring_options={{'group': init_device_mesh(device_type, ({world // ring.size()}, "
                f"{ring.size()}), mesh_dim_names=('dp', 'ring')), 'mesh_dim': 'ring'}}"
            )
        ring_dim = group.mesh_dim_names.index(mesh_dim) if isinstance(mesh_dim, str) else mesh_dim
        dp_dim = 1 - ring_dim % 2
        return cls(
            ring,
            ring.size(),
            group.get_group(dp_dim),
            group.size(dp_dim),
            group.get_local_rank(dp_dim),
        )


def refuse_parallelism_config(parallelism_config) -> None:
    """Refuse accelerate's ``ParallelismConfig``: its ``cp_size`` turns on PyTorch's own context
    parallelism, and its other dims lay out data parallelism over every process, where the ring
    runs it across rings only."""
    if parallelism_config is None:
        return
    if parallelism_config.cp_size > 1:
        raise RingCompileError(
            f"ParallelismConfig(cp_size={parallelism_config.cp_size}) turns on PyTorch's own "
            "context_parallel, which shards the sequence its own way and conflicts with the ring, "
            "the context parallelism here. Leave parallelism_config unset and name the ring in "
            "ring_options: every process by default, or {'group': mesh, 'mesh_dim': 'ring'} over "
            "a 2-D DeviceMesh (dp, ring) for data parallelism across rings."
        )
    raise RingCompileError(
        "the ring lays out its data parallelism itself (DDP over the other dim of "
        "ring_options' mesh); leave parallelism_config unset"
    )


def _refuse_conflicts(accelerator: Accelerator) -> None:
    if accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        raise RingCompileError(
            f"accelerate is set to compile the model itself (dynamo backend "
            f"{accelerator.state.dynamo_plugin.backend.value!r}), while RingAccelerator compiles "
            "its forward with backend='ring': leave accelerate's dynamo_backend unset and pass "
            "compile options in ring_options (e.g. {'mode': 'max-autotune'})"
        )
    refuse_parallelism_config(accelerator.parallelism_config)
    if accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
        DistributedType.XLA,
    ):
        raise RingCompileError(
            f"the ring does not run under {accelerator.distributed_type.value}, which shards the "
            "model and reduces its gradients over every process, the ring's ranks included; "
            "RingAccelerator wraps the model in DDP over the data-parallel group instead"
        )
    if accelerator.dispatch_batches:
        raise RingCompileError(
            "dispatch_batches=True sends each process a slice of one batch; the ranks of a ring "
            "need the same whole batch: leave dispatch_batches unset"
        )


class _DataParallelScheduler(AcceleratedScheduler):
    """``AcceleratedScheduler`` stepping once per data-parallel rank at each optimizer step."""

    def __init__(self, prepared: AcceleratedScheduler, dp_size: int):
        super().__init__(
            prepared.scheduler,
            prepared.optimizers,
            step_with_optimizer=prepared.step_with_optimizer,
            split_batches=prepared.split_batches,
        )
        self.dp_size = dp_size

    def step(self, *args, **kwargs):
        if (
            self.split_batches
            or not self.step_with_optimizer
            or not self.gradient_state.sync_gradients
            or any(opt.step_was_skipped for opt in self.optimizers)
        ):
            super().step(*args, **kwargs)
            return
        for _ in range(self.dp_size):
            # OneCycleLR refuses steps past its total_steps (a last batch that drop_last kept)
            if self.scheduler._step_count <= getattr(self.scheduler, "total_steps", float("inf")):
                self.scheduler.step(*args, **kwargs)


class RingAccelerator(Accelerator):
    """An ``Accelerator`` whose ``prepare`` trains on the ring (the module's docstring says how).

    ``ring_options``: the backend's options, ``group``/``mesh_dim`` naming the ring (default: every
    process). ``ring`` holds the resulting ``RingGroups``. Refused with ``RingCompileError``:
    accelerate's own ``torch.compile`` (``dynamo_backend``), a ``parallelism_config``, FSDP,
    DeepSpeed and ``dispatch_batches=True``.
    """

    def __init__(self, *args, ring_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_ring(ring_options)

    @classmethod
    def adopt(cls, accelerator: Accelerator, ring_options: dict | None = None) -> RingAccelerator:
        """``accelerator``, built elsewhere and not yet used to prepare anything, made a
        RingAccelerator in place (transformers' Trainer builds its own from its arguments)."""
        accelerator.__class__ = cls
        accelerator._set_ring(ring_options)
        return accelerator

    def _set_ring(self, ring_options: dict | None) -> None:
        _refuse_conflicts(self)
        self.ring_options = dict(ring_options or {})
        self.ring = RingGroups.from_options(self.ring_options)
        world = self.ring.ring_size * self.ring.dp_size
        if world != self.num_processes:
            raise RingCompileError(
                f"accelerate counts {self.num_processes} process(es) but torch.distributed "
                f"{world}: start the processes with torchrun or accelerate launch, or set RANK, "
                "WORLD_SIZE and LOCAL_RANK in each before accelerate starts, so that both count "
                "the same world"
            )

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        if getattr(model, "_is_accelerate_prepared", False):
            return super().prepare_model(model, device_placement, evaluation_mode)
        if not getattr(model, "_ring_compiled", False):  # evaluation may have prepared it first
            model.forward = torch.compile(model.forward, backend="ring", options=self.ring_options)
            model._ring_compiled = True
        # accelerate's device placement and mixed precision, without its DDP over every process
        model = super().prepare_model(model, device_placement, evaluation_mode=True)
        if evaluation_mode:
            return model
        if self.ring.ring is not None:
            # as DDP does: every process starts from rank 0's weights (random initialisations
            # differ by rank unless seeded alike, and the ring's ranks must hold the same ones)
            with torch.no_grad():
                for t in itertools.chain(model.parameters(), model.buffers()):
                    dist.broadcast(t, src=0)
        if self.ring.dp is not None and any(p.requires_grad for p in model.parameters()):
            model = DistributedDataParallel(
                model,
                process_group=self.ring.dp,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **(self.ddp_handler.to_kwargs() if self.ddp_handler is not None else {}),
            )
            if self.ddp_handler is not None:
                self.ddp_handler.register_comm_hook(model)
        return model

    def prepare_data_loader(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
        if getattr(data_loader, "_is_accelerate_prepared", False):
            return super().prepare_data_loader(data_loader, device_placement, slice_fn_for_dispatch)
        prepared = prepare_data_loader(
            data_loader,
            self.device,
            num_processes=self.ring.dp_size,
            process_index=self.ring.dp_rank,
            split_batches=self.split_batches,
            put_on_device=self.device_placement if device_placement is None else device_placement,
            rng_types=self.rng_types.copy(),
            dispatch_batches=False,
            even_batches=self.even_batches,
            use_seedable_sampler=self.use_seedable_sampler,
            data_seed=self.dataloader_config.data_seed,
            non_blocking=self.non_blocking,
            use_stateful_dataloader=self.use_stateful_dataloader,
        )
        self._dataloaders.append(prepared)
        return prepared

    def prepare_scheduler(self, scheduler):
        if getattr(scheduler, "_is_accelerate_prepared", False):
            return super().prepare_scheduler(scheduler)
        prepared = _DataParallelScheduler(super().prepare_scheduler(scheduler), self.ring.dp_size)
        self._schedulers[-1] = prepared
        return prepared

    def gather_for_metrics(self, input_data, use_gather_object=False):
        """``Accelerator.gather_for_metrics`` over the data-parallel group: each ring's values once
        (its ranks hold the same), the last batch cut as accelerate cuts it."""
        try:
            recursively_apply(lambda x: x, input_data, error_on_other_type=True)
        except TypeError:
            use_gather_object = True
        if use_gather_object:
            data = self._gather_objects(input_data)
        else:
            data = recursively_apply(self._gather_tensor, input_data)
        # accelerate pads the last batches with samples from the start so that every data-parallel
        # rank gets one; remainder says how many gathered samples are real
        remainder = self.gradient_state.remainder if self.gradient_state.end_of_dataloader else 0
        if remainder > 0:
            if use_gather_object:
                return data[:remainder]
            return recursively_apply(lambda t: t[:remainder], data)
        return data

    def _gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 0:
            tensor = tensor[None]
        if self.ring.dp is None:
            return tensor
        out = tensor.new_empty((self.ring.dp_size * tensor.shape[0], *tensor.shape[1:]))
        all_gather_single(out, tensor.contiguous(), group=self.ring.dp)
        return out

    def _gather_objects(self, objects):
        if self.ring.dp is None:
            return objects
        out = [None] * self.ring.dp_size
        dist.all_gather_object(out, objects, group=self.ring.dp)
        return [x for each in out for x in each]
