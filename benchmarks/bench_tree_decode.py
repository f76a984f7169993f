"""Decode-step latency: tree_attn_decode vs all-gathering the KV cache and running SDPA locally.

Each rank holds 1/W of a KV cache of S tokens and the same new query (T tokens). Per step:

- tree: ``tree_attn_decode``: local partial attention, one all-gather of (B, H, T, D+1) partials,
  a local log-sum-exp merge;
- allgather-kv: one all-gather of this rank's K and V (2 * B * Hkv * S/W * D elements), then
  ``F.scaled_dot_product_attention`` over the whole cache.

Every timed step starts after a barrier; a rank's latency is its median over the steps and the
table shows the slowest rank's. Both methods are checked against each other once per length.
With ``--cuda-graph`` each method's step is captured as a CUDA graph (collective included) and
replayed, as the backend's decode steps run under ``mode="reduce-overhead"``: what is left is the
GPU's time, without the host's launches.

Launch with torchrun (one rank per process; NCCL and CUDA when available)::

    torchrun --nproc-per-node 4 benchmarks/bench_tree_decode.py

or without it, which spawns ``--world-size`` gloo ranks on the CPU::

    python benchmarks/bench_tree_decode.py --world-size 4 --lengths 1024 4096 16384
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ringcompile.tree_decode import tree_attn_decode

# torch 2.13 renamed all_gather_into_tensor to all_gather_single and deprecated the old name
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="gloo ranks to spawn without torchrun")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[1024, 4096, 16384],
        help="total cache lengths S (each rank holds S / W)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1, help="T: new tokens per step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--causal",
        action="store_true",
        help="tree: causal by global position (a striped cache, the new tokens after "
        "it), as the backend's decode steps run; every key stays visible",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time each step captured as a CUDA graph and replayed (CUDA only)",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    return p.parse_args()


def _allgather_kv_then_sdpa(q, k, v, world):
    B, Hkv, S_r, D = k.shape
    kv = torch.stack([k, v])  # one collective for both
    gathered = kv.new_empty((world * 2, B, Hkv, S_r, D))  # gloo wants the dim-0 concatenation
    _all_gather_into_tensor(gathered, kv)
    # (W, 2, B, Hkv, S_r, D) -> K, V (B, Hkv, W * S_r, D)
    full = gathered.view(world, 2, B, Hkv, S_r, D).permute(1, 2, 3, 0, 4, 5)
    full = full.reshape(2, B, Hkv, world * S_r, D)
    return F.scaled_dot_product_attention(q, full[0], full[1], enable_gqa=True)


def _captured(fn):
    """``fn``'s step as a CUDA graph: (replay, its output). Warmed up on a side stream first, as
    capture requires (NCCL's communicator and Triton's kernels are set up outside the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _latency_ms(fn, args, device) -> float:
    """The slowest rank's median step time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    worst = torch.tensor([statistics.median(times) * 1e3], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _bench(rank: int, world: int, args, device: torch.device) -> None:
    dtype = getattr(torch, args.dtype)
    B, H, Hkv, D, T = args.batch, args.heads, args.kv_heads, args.head_dim, args.queries
    rows = []
    for S in args.lengths:
        if S % world:
            raise ValueError(f"cache length {S} is not a multiple of the world size {world}")
        g = torch.Generator().manual_seed(0)  # the same query on every rank
        q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
        k = torch.randn(B, Hkv, S // world, D).to(device, dtype)
        v = torch.randn(B, Hkv, S // world, D).to(device, dtype)
        causal = {}
        if args.causal:
            causal = dict(
                is_causal=True,
                q_positions=torch.arange(S, S + T, device=device),
                k_positions=torch.arange(rank, S, world, device=device),
            )
        tree = functools.partial(tree_attn_decode, q, k, v, enable_gqa=True, **causal)
        gather = functools.partial(_allgather_kv_then_sdpa, q, k, v, world)
        with torch.no_grad():
            expected = gather()
            torch.testing.assert_close(tree(), expected, atol=2e-2, rtol=2e-2)
            if args.cuda_graph:
                # (the graphs go before the process group does: NCCL work captured in a graph
                # that outlives its communicator hangs the exit)
                (tree_graph, tree_out), (gather_graph, gather_out) = (
                    _captured(tree),
                    _captured(gather),
                )
                tree_graph.replay()
                gather_graph.replay()
                torch.testing.assert_close(tree_out, expected, atol=2e-2, rtol=2e-2)
                torch.testing.assert_close(gather_out, expected, atol=2e-2, rtol=2e-2)
                tree, gather = tree_graph.replay, gather_graph.replay
            t_tree = _latency_ms(tree, args, device)
            t_gather = _latency_ms(gather, args, device)
            del tree, gather
        acc_bytes = 8 if dtype == torch.float64 else 4
        tree_recv = (world - 1) * B * H * T * (D + 1) * acc_bytes
        kv_recv = (world - 1) * 2 * B * Hkv * (S // world) * D * k.element_size()
        rows.append((S, S // world, t_tree, t_gather, t_gather / t_tree, tree_recv, kv_recv))
    if rank == 0:
        print(
            f"W={world}, {dist.get_backend()}, {device.type}, {args.dtype}, B={B} H={H} "
            f"Hkv={Hkv} D={D} T={T}{', causal by position' if args.causal else ''}"
            f"{', captured as CUDA graphs' if args.cuda_graph else ''}, median of "
            f"{args.iters} steps (slowest rank)"
        )
        print(
            "| cache S | per rank | tree_attn_decode ms | allgather-KV+SDPA ms | speedup "
            "| recv/rank tree | recv/rank KV |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for S, S_r, tt, tg, sp, rt, rk in rows:
            print(f"| {S} | {S_r} | {tt:.3f} | {tg:.3f} | {sp:.1f}x | {_size(rt)} | {_size(rk)} |")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _spawned(rank: int, world: int, init_file: str, args) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _bench(rank, world, args, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = _parse()
    if args.cuda_graph and not torch.cuda.is_available():
        raise SystemExit("--cuda-graph needs CUDA GPUs")
    if "RANK" in os.environ:  # torchrun
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cpu")
        if cuda:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        try:
            _bench(dist.get_rank(), dist.get_world_size(), args, device)
        finally:
            dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _spawned,
            args=(args.world_size, os.path.join(tmp, "store"), args),
            nprocs=args.world_size,
        )


if __name__ == "__main__":
    main()
