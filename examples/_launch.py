"""Start the examples' ranks: under torchrun (NCCL on GPUs), or spawned on the CPU over gloo.

launch(worker, args, world)   # worker(device, args) runs on every rank, the group initialised
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._inductor.cudagraph_trees import reset_cudagraph_trees

from ringcompile.group import nccl_options


def _run(rank: int, world: int, worker, args, port: int) -> None:
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", pg_options=nccl_options())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # the spawned ranks share the machine's cores
        init = "env://" if "LOCAL_RANK" in os.environ else f"tcp://127.0.0.1:{port}"
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        worker(device, args)
    finally:
        if device.type == "cuda":
            # CUDA graphs that captured NCCL work (decode steps under mode="reduce-overhead") must
            # go before the communicator does: destroying the group under them hangs at exit
            reset_cudagraph_trees()
            torch.cuda.synchronize(device)
        dist.destroy_process_group()


def launch(worker, args, world: int) -> None:
    """Run ``worker(device, args)`` on every rank: torchrun's, else ``world`` spawned CPU ranks."""
    if "LOCAL_RANK" in os.environ:
        _run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), worker, args, 0)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(world, worker, args, port), nprocs=world)
