"""Print what the ``ring`` backend does to a small transformer: ``ringcompile.explain``.

python examples/inspect_graph.py            # two CPU ranks over gloo; rank 0 prints
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ringcompile
from ringcompile.testing_models import TinyTransformer


def worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    model = TinyTransformer(layers=1, rope="cached")
    report = ringcompile.explain(
        model, torch.randint(0, 64, (2, 32)), options={"layout": "zigzag", "compiler": "aot_eager"}
    )
    if rank == 0:
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port), nprocs=2)
