"""Train a small Llama with transformers' Trainer on the ring: ``RingTrainer``.

    torchrun --nproc-per-node 2 examples/hf_trainer.py --check            # CPUs: gloo
    torchrun --nproc-per-node 8 examples/hf_trainer.py --seq-len 32768    # GPUs: NCCL
    python examples/hf_trainer.py --check                                  # spawns 2 CPU ranks

Every rank builds the same random Llama (transformers' LlamaForCausalLM, ``attn_implementation=
"sdpa"``); RingTrainer compiles its forward with ``backend="ring"``, gives every rank the same
batches and shards each sequence over the ranks. The sequences are arithmetic progressions (a
random start and stride each, modulo the vocabulary), so the loss falls. With ``--check``, rank 0
then trains the same model on the same batches with a plain Trainer in one process (a child
process: accelerate keeps one state per process) and compares the logged losses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from _launch import launch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ringcompile.integrations.transformers import RingTrainer


class Progressions(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int):
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimes(TrainerCallback):
    """Wall time of each optimizer step (the loss logged at every step synchronises the GPU)."""

    def __init__(self):
        self.times = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        """The median step after the first two (compilation and warm-up)."""
        steps = [b - a for a, b in zip(self.times, self.times[1:])][2:]
        return statistics.median(steps) if steps else float("nan")


def train(args, trainer_cls, device: torch.device, **ring) -> tuple[list[float], float]:
    """The loss logged at each step of a training run, and its seconds per step."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.seq_len,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    training = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=trainer_cls is Trainer,  # the ring's progress bar is the one to watch
        use_cpu=device.type == "cpu",
        seed=0,
    )
    data = Progressions(args.steps * args.grad_accum, args.seq_len, args.vocab)
    timer = StepTimes()
    trainer = trainer_cls(model=model, args=training, train_dataset=data, callbacks=[timer], **ring)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], timer.seconds_per_step()


def worker(device: torch.device, args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if "LOCAL_RANK" not in os.environ:
        # spawned here rather than by torchrun: tell accelerate the world that is initialised
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",
        )
    if rank == 0:
        print(
            f"{world} ranks ({'NCCL' if device.type == 'cuda' else 'gloo'}), {args.seq_len} "
            f"tokens a sequence: {args.seq_len // world} per rank"
        )
    options = {"layout": args.layout, "compiler": args.compiler}
    ring, ring_step = train(args, RingTrainer, device, ring_options=options)
    if rank == 0:
        print(f"RingTrainer: {ring_step:.3f} s a step ({world} ranks)")
    if rank == 0 and args.check:
        alone, alone_step = json.loads(alone_in_child(args).splitlines()[-1])
        print(f"Trainer, one process: {alone_step:.3f} s a step")
        worst = max(abs(a - b) / abs(b) for a, b in zip(ring, alone))
        print(f"losses, ring:        {[round(x, 5) for x in ring]}")
        print(f"losses, one process: {[round(x, 5) for x in alone]}")
        print(
            f"largest relative difference {worst:.2e}: {'OK' if worst < args.tol else 'MISMATCH'}"
        )
        if worst >= args.tol:
            sys.exit(1)


def alone_in_child(args) -> str:
    """This script's stdout with ``--alone``, in a process outside the launcher's world."""
    launcher = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    )
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    child = [sys.executable, __file__, *sys.argv[1:], "--alone"]
    return subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="CPU ranks to spawn (not under torchrun)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-2 in float32 (CPUs), 1e-3 in bfloat16 (GPUs), where a larger "
                        "step makes the run chaotic and the comparison meaningless")  # fmt: skip
    p.add_argument("--layout", default="zigzag", choices=["striped", "zigzag", "contiguous"])
    p.add_argument("--compiler", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="inside the backend; default: inductor on GPUs, aot_eager on CPUs")  # fmt: skip
    p.add_argument("--output-dir", default="hf_trainer_out")
    p.add_argument("--check", action="store_true", help="compare with one process's losses")
    p.add_argument("--tol", type=float, default=None,
                   help="relative loss agreement --check requires; default: 1e-4 in float32 "
                        "(CPUs), 2e-2 in bfloat16 (GPUs)")  # fmt: skip
    p.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    on_gpu = torch.cuda.is_available()
    args.compiler = args.compiler or ("inductor" if on_gpu else "aot_eager")
    args.tol = args.tol or (2e-2 if on_gpu else 1e-4)
    args.lr = args.lr or (1e-3 if on_gpu else 1e-2)
    if args.alone:
        device = torch.device("cuda" if on_gpu else "cpu")
        print(json.dumps(train(args, Trainer, device)))  # [losses, seconds a step]
        return
    launch(worker, args, args.world)


if __name__ == "__main__":
    main()
