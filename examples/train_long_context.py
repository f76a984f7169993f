"""Train a small transformer with context parallelism: ``torch.compile(model, backend="ring")``.

    python examples/train_long_context.py                 # spawns 4 CPU ranks over gloo
    python examples/train_long_context.py --world 2 --seq 512
    torchrun --nproc-per-node 8 examples/train_long_context.py --seq 65536   # GPUs: NCCL + Triton

Every rank builds the same model and feeds the same full batch; the compiled model computes on its
rank's tokens and returns full logits. At the end the losses are checked against the same steps
run on one process without the backend.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _launch import launch

from ringcompile.testing_models import TinyTransformer


def progress(step: int, total: int, loss: float, started: float) -> None:
    done = int(30 * step / total)
    sys.stderr.write(
        f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{total} loss {loss:.4f} "
        f"({time.time() - started:.1f}s)"
    )
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def train(args, device, compiled: bool, show: bool) -> list[float]:
    torch.manual_seed(0)
    model = TinyTransformer(
        vocab=args.vocab, dim=args.dim, layers=args.layers, max_len=args.seq
    ).to(device)
    if compiled:
        model = torch.compile(
            model, backend="ring", options={"layout": args.layout, "compiler": args.compiler}
        )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses, started = [], time.time()
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=data).to(device)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if show:
            progress(step, args.steps, losses[-1], started)
    return losses


def worker(device: torch.device, args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = device.type == "cuda"
    if rank == 0:
        print(
            f"{world} ranks ({'NCCL' if on_gpu else 'gloo'}), {args.seq} tokens, "
            f"{args.layout} layout: {args.seq // world} tokens per rank"
        )
    ring = train(args, device, compiled=True, show=rank == 0)
    if rank == 0:
        alone = train(args, device, compiled=False, show=False)
        worst = max(abs(a - b) for a, b in zip(ring, alone))
        print(f"losses, ring:        {[round(x, 5) for x in ring]}")
        print(f"losses, one process: {[round(x, 5) for x in alone]}")
        print(f"largest difference {worst:.2e}: {'OK' if worst < args.tol else 'MISMATCH'}")
        if worst >= args.tol:
            sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--world", type=int, default=4, help="CPU ranks to spawn (ignored under torchrun)"
    )
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layout", default="zigzag", choices=["striped", "zigzag", "contiguous"])
    p.add_argument("--compiler", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--tol", type=float, default=1e-4, help="loss agreement required (float32)")
    args = p.parse_args()
    launch(worker, args, args.world)


if __name__ == "__main__":
    main()
