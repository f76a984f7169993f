"""transformers' Trainer on the ring: ``RingTrainer`` trains with the sequence of every batch
sharded over the ranks of a ring, and data parallelism across rings.

    trainer = RingTrainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                          ring_options={"layout": "zigzag"})
    trainer.train()

It is launched as any Trainer script (``torchrun --nproc-per-node N train.py``: accelerate
initialises the process group). Its accelerator is a ``RingAccelerator``
(``ringcompile.integrations.accelerate``): the model's forward is compiled with
``backend="ring"`` and ``ring_options``, the ranks of a ring draw the same batches, DDP runs over
the data-parallel group only, and evaluation gathers each ring's predictions once. The Trainer
itself counts per data-parallel rank, not per process: the items that divide the loss under
gradient accumulation (``num_items_in_batch``), the factor that undoes DDP's average, the total
batch size and the tokens seen. Checkpoints are written by rank 0 and resumed as usual.

Refused with ``RingCompileError``, naming the fix: ``torch_compile`` in TrainingArguments (the ring
compiles the model), a ``parallelism_config`` (its ``cp_size`` turns on PyTorch's own context
parallelism), ``train_sampling_strategy="batch_rebalance"`` (its sampler shards by process), FSDP
and DeepSpeed.
"""

from __future__ import annotations

import functools

from transformers import Trainer

from ringcompile.errors import RingCompileError
from ringcompile.integrations.accelerate import RingAccelerator, refuse_parallelism_config

__all__ = ["RingTrainer"]


def _refuse_conflicts(args) -> None:
    if args.torch_compile:
        raise RingCompileError(
            "RingTrainer compiles the model's forward with backend='ring' itself: leave "
            "torch_compile, torch_compile_backend and torch_compile_mode unset in "
            "TrainingArguments and pass compile options in ring_options, e.g. "
            "RingTrainer(..., ring_options={'mode': 'max-autotune'})"
        )
    refuse_parallelism_config(args.parallelism_config)
    if args.train_sampling_strategy == "batch_rebalance":
        raise RingCompileError(
            "train_sampling_strategy='batch_rebalance' shards batches by process, so the ranks "
            "of a ring would draw different ones: use 'random', 'sequential' or "
            "'group_by_length'"
        )


class RingTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on the ring (the module's docstring says how).

    ``ring_options``: the backend's options (docs/backend.md), ``group``/``mesh_dim`` naming the
    ring: every process by default, or one dim of a 2-D DeviceMesh ``(data parallel, ring)``. The
    other arguments are ``Trainer``'s. A subclass of another Trainer (``class
    MyTrainer(RingTrainer, SFTTrainer)``) trains on the ring the same way.
    """

    def __init__(
        self, model=None, args=None, *trainer_args, ring_options: dict | None = None, **kw
    ):
        if args is not None:
            # before Trainer builds its accelerator, where these fail with accelerate's messages
            _refuse_conflicts(args)
        self.ring_options = dict(ring_options or {})
        super().__init__(model, args, *trainer_args, **kw)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        RingAccelerator.adopt(self.accelerator, self.ring_options)
        # Trainer bound the gather of evaluation to the accelerator's method before the adoption
        self.gather_function = functools.partial(
            self.accelerator.gather_for_metrics, use_gather_object=self.args.eval_use_gather_object
        )

    def get_tp_size(self) -> int:
        """The processes that share each batch, as Trainer reads this: it divides the count of
        items gathered over every process by it, multiplies the loss by the number of processes
        over it (undoing DDP's average) and divides the world by it for the total batch size. The
        ranks of a ring share their batches."""
        return super().get_tp_size() * self.accelerator.ring.ring_size

    def _track_num_input_tokens(self, inputs) -> None:
        # Trainer sums the count over every process: each rank of a ring counts the batch they share
        seen = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        added = self.state.num_input_tokens_seen - seen
        self.state.num_input_tokens_seen = seen + added // self.accelerator.ring.ring_size
