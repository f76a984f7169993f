"""Ring attention on real ranks: throughput as a share of ideal, and whether communication hides.

Llama-3-8B attention heads (32 query / 8 KV heads, head dim 128), ``--tokens-per-rank`` tokens per rank
(8192 by default), causal, bf16, forward + backward, one rank per GPU over NCCL::

    torchrun --nproc-per-node W benchmarks/bench_ring.py [--out DIR]

(without torchrun it spawns ``--world-size`` gloo ranks on the CPU at toy sizes, to check the
script). Every measurement starts after a barrier; the table shows the slowest rank's median,
as throughput (calls back to back) and as the time of one call from an idle GPU (see ``Timer``).

- ideal: ``ring_attention`` on the whole sequence (W x local tokens) on one GPU, / W: with the
  default kernels that is cuDNN's causal kernel (one plain block), with ``triton`` ours;
- ours, per layout and ``--kernels`` choice: ``ring_attention`` (the whole ring: P2P overlapped
  with the kernels); "auto" (the default: plain blocks on cuDNN) and "triton" (every block in
  Triton);
- ours, no communication: that rank's part of the ring on a ring that sends nothing (its schedule
  and kernels, on its own K/V): if the ring takes about as long, the sends hid under the compute;
- ours ulysses (where the heads split over W): ``strategy="ulysses"``, the all-to-alls over heads
  and one attention over the whole sequence for H/W heads; "no communication" is that attention
  with its reordering alone;
- PyTorch ``context_parallel`` (its SDPA ring through DTensor, load-balanced by default, cuDNN
  blocks; K/V expanded to 32 heads, since its fused kernels need equal head counts);
- the seed package (``ring-attention-pytorch`` 0.5.20, striped, ``ring_reduce_col=True``), when
  installed (``../shared/peer-seed-on-gpu.md``).

efficiency = cuDNN's ideal / measured; the same sequence and FLOPs for every row.

``--mask documents`` / ``--mask padding``: causal with packed documents (~1k tokens each) or
with the first eighth of the keys padded, given to every row as ``ring_attention`` takes them
(the rank's ``document_ids`` / ``key_padding_mask``); the blocks are then masked (our Triton
kernels), the ideal is the same call on the whole sequence on one GPU / W, TFLOP/s count the
pairs the mask allows, and the peers (causal only) are left out.

With ``--mask documents`` the same documents also run as a flex user writes them, a
``mask_mod`` (causal inside each document): ours with the ``mask_mod`` given to the ring
(evaluated on each step's block), flex_attention compiled on one GPU over the whole sequence
(time / W), and PyTorch ``context_parallel``'s flex route (K/V all-gathered each call, the
per-document head-tail load balancer).

``--trace`` also profiles each layout's ring on the GPU (CUDA kernels only) and splits its time
into compute kernels, communication kernels hidden under compute, exposed communication and idle
GPU time, and lists the kernels that take the time (ms per call, by name); the traces go to
``--out`` as ``trace_<layout>_rank<r>.json.gz``.
``--nccl-high-priority`` gives NCCL high-priority streams, so its kernels take SMs as soon as
they free up instead of queueing behind a running attention kernel's programs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from saving import save_run  # (benchmarks/saving.py: a script's folder is on its path)

from ringcompile import make_layout, ring_attention
from ringcompile.group import nccl_options
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.ring import LocalRing, RankCall
from ringcompile.ring.backward import ring_backward
from ringcompile.ring.forward import ring_forward
from ringcompile.ulysses import split_refusal

LAYOUTS = ["contiguous", "striped", "zigzag"]
MASKS = ["causal", "documents", "padding"]
MASK_NAMES = {
    "causal": "causal",
    "documents": "causal, packed documents of ~1k tokens",
    "padding": "causal, left padding of an eighth of the keys",
}
IDEALS = {
    "auto": "ideal: cuDNN on one GPU, whole sequence (time / W)",
    "triton": "ideal: our Triton kernel on one GPU, whole sequence (time / W)",
}


def ideal_name_of(kernels: str, mask: str) -> str:
    if mask != "causal" and kernels == "auto":  # the block engine's kernel for the mask's blocks
        kernel = "FA2 varlen" if mask == "documents" else "Triton"
        return (
            f"ideal: the default kernels ({mask}: {kernel}) on one GPU, whole sequence (time / W)"
        )
    return IDEALS[kernels]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tokens-per-rank", type=int, default=8192, help="tokens per rank")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="groups of back-to-back calls")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--world-size", type=int, default=2, help="gloo ranks without torchrun")
    p.add_argument("--trace", action="store_true", help="profile where each layout's time goes")
    p.add_argument("--nccl-high-priority", action="store_true")
    p.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["auto", "triton"],
        choices=["auto", "triton"],
        help="block kernel choices of ring_attention to time",
    )
    p.add_argument("--no-peers", action="store_true", help="skip context_parallel and the seed")
    p.add_argument("--tag", default="", help="suffix of the JSON file's name (runs side by side)")
    p.add_argument("--mask", default="causal", choices=MASKS,
                   help="causal; or causal with packed documents (~1k tokens) or left padding "
                        "(an eighth of the keys): the masked kernels, no peers")  # fmt: skip
    p.add_argument("--replot", metavar="DIR", help="only draw DIR/bench_ring.png from its JSON")
    return p.parse_args()


class Timer:
    """Two times of ``fn`` on this rank, every measurement started together (barrier):

    - ``ms``: throughput, ``iters`` calls back to back between two events, as a training step's
      layers run (the host enqueues while the GPU computes); the median of ``repeats`` groups;
    - ``call_ms``: one call at a time from an idle GPU (synchronised before and after), so the
      host's launch latency before the first kernel counts too; the median over ``iters``.
    """

    def __init__(self, device, args):
        self.device, self.args = device, args

    def _elapsed(self, fn, calls: int) -> float:
        dist.barrier()
        if self.device.type != "cuda":
            t0 = datetime.datetime.now()
            for _ in range(calls):
                fn()
            return (datetime.datetime.now() - t0).total_seconds() * 1e3 / calls
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls

    def __call__(self, fn) -> dict:
        for _ in range(self.args.warmup):
            fn()
        call = [self._elapsed(fn, 1) for _ in range(self.args.iters)]
        thr = [self._elapsed(fn, self.args.iters) for _ in range(self.args.repeats)]
        return {"ms": statistics.median(thr), "call_ms": statistics.median(call)}


def slowest(times: dict, device) -> dict:
    t = torch.tensor(list(times.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(times, t.tolist()))


def rand(device, dtype, *shape):
    return torch.randn(*shape, device=device, dtype=dtype)


def fwd_bwd(fn, inputs, dout):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, dout)

    return run


def sequence_facts(args, S: int) -> tuple[dict, int]:
    """``--mask``'s per-token facts of the whole sequence (B = 1) as ``ring_attention`` takes
    them, and the (query, key) pairs the mask allows."""
    if args.mask == "documents":  # ~1k tokens each, the same draw as bench_kernels.py --masks
        g = torch.Generator().manual_seed(1)
        docs = torch.cumsum(torch.rand(1, S, generator=g) < 1 / 1024, 1)
        counts = torch.bincount(docs[0])
        return {"document_ids": docs}, int((counts * (counts + 1) // 2).sum())
    if args.mask == "padding":  # left padding: no query sees the first eighth of the keys
        pad = S // 8
        return {"key_padding_mask": (torch.arange(S) >= pad)[None]}, (S - pad) * (S - pad + 1) // 2
    return {}, S * (S + 1) // 2


def facts_of(args, layout, rank: int, device) -> dict:
    """This rank's share of ``--mask``'s facts (whole sequence for one rank of a ring of one)."""
    facts, _ = sequence_facts(args, layout.seq_len)
    pos = layout.positions(rank)
    return {name: t[:, pos].to(device) for name, t in facts.items()}


def ours(layout_name, args, world, device, dtype, kernels="auto", strategy="ring"):
    lay = make_layout(layout_name, args.tokens_per_rank * world, world)
    q = rand(device, dtype, 1, args.heads, args.tokens_per_rank, args.head_dim).requires_grad_()
    k = rand(device, dtype, 1, args.kv_heads, args.tokens_per_rank, args.head_dim).requires_grad_()
    v = rand(device, dtype, 1, args.kv_heads, args.tokens_per_rank, args.head_dim).requires_grad_()
    dout = rand(device, dtype, *q.shape)
    facts = facts_of(args, lay, dist.get_rank(), device)
    return fwd_bwd(
        lambda q, k, v: ring_attention(q, k, v, is_causal=True, enable_gqa=True, layout=lay,
                                       kernels=kernels, strategy=strategy, **facts),
        (q, k, v), dout,
    )  # fmt: skip


def ulysses_without_communication(args, world, device, dtype):
    """A rank's Ulysses compute without its all-to-alls: the attention over the whole sequence for
    its H/W query heads (and the KV heads they use), with the reordering into and out of natural
    order, on a group of one."""
    S = args.tokens_per_rank * world
    h, hkv = args.heads // world, max(args.kv_heads // world, 1)
    q = rand(device, dtype, 1, h, S, args.head_dim).requires_grad_()
    k = rand(device, dtype, 1, hkv, S, args.head_dim).requires_grad_()
    v = rand(device, dtype, 1, hkv, S, args.head_dim).requires_grad_()
    dout = rand(device, dtype, *q.shape)
    alone, _ = dist.new_subgroups(group_size=1)  # collective: every rank makes its own group
    facts = facts_of(args, make_layout("contiguous", S, 1), 0, device)
    return fwd_bwd(
        lambda q, k, v: ring_attention(q, k, v, is_causal=True, enable_gqa=True, group=alone,
                                       strategy="ulysses", **facts),
        (q, k, v), dout,
    )  # fmt: skip


def ours_without_communication(layout_name, args, world, device, dtype, kernels="auto"):
    """This rank's part of the ring, its schedule and kernels, on a ring that sends nothing
    (``LocalRing``: each step's keys are its own, with their facts; the agreement is the real
    ring's, so idle padding is dropped as there)."""
    q = rand(device, dtype, 1, args.heads, args.tokens_per_rank, args.head_dim)
    k = rand(device, dtype, 1, args.kv_heads, args.tokens_per_rank, args.head_dim)
    v = rand(device, dtype, 1, args.kv_heads, args.tokens_per_rank, args.head_dim)
    dout = rand(device, dtype, *q.shape)
    lay = make_layout(layout_name, args.tokens_per_rank * world, world)
    mask = AttentionMask(PositionRules(causal=True), **facts_of(args, lay, dist.get_rank(), device))
    ring, scale = (
        LocalRing(dist.get_rank(), world, agree_over=dist.group.WORLD),
        args.head_dim**-0.5,
    )

    def run():
        out, lse = ring_forward(RankCall.on(ring, q, mask, lay, kernels), q, k, v, scale)
        ring_backward(RankCall.on(ring, q, mask, lay, kernels), dout, q, k, v, out, lse, scale)

    return run


def monolithic(args, world, device, dtype, kernels="auto"):
    """The same kernels on the whole sequence on this one device (no process group)."""
    S = args.tokens_per_rank * world
    q = rand(device, dtype, 1, args.heads, S, args.head_dim).requires_grad_()
    k = rand(device, dtype, 1, args.kv_heads, S, args.head_dim).requires_grad_()
    v = rand(device, dtype, 1, args.kv_heads, S, args.head_dim).requires_grad_()
    dout = rand(device, dtype, *q.shape)
    alone, _ = dist.new_subgroups(group_size=1)  # collective: every rank makes its own group
    facts = facts_of(args, make_layout("contiguous", S, 1), 0, device)
    return fwd_bwd(
        lambda q, k, v: ring_attention(q, k, v, is_causal=True, enable_gqa=True, group=alone,
                                       kernels=kernels, **facts),
        (q, k, v), dout,
    )  # fmt: skip


def torch_context_parallel(args, world, device, dtype):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S, G = args.tokens_per_rank * world, args.heads // args.kv_heads
    mesh = init_device_mesh(device.type, (world,))
    q = rand(device, dtype, 1, args.heads, S, args.head_dim)
    k = rand(device, dtype, 1, args.kv_heads, S, args.head_dim).repeat_interleave(G, 1)
    v = rand(device, dtype, 1, args.kv_heads, S, args.head_dim).repeat_interleave(G, 1)
    dout = rand(device, dtype, *q.shape)
    ctx = context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2])
    ctx.__enter__()  # shards the buffers in place; left entered for the timing, exited after
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def run():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        torch.autograd.grad(out, (qg, kg, vg), dout)

    return run, ctx


def _documents_mask_mod(docs: torch.Tensor):
    """flex's document mask over global positions: causal inside each document."""

    def documents(b, h, q_idx, kv_idx, docs=docs):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (kv_idx <= q_idx)

    return documents


def ours_mask_mod(layout_name, args, world, device, dtype):
    """``--mask documents`` given as a flex ``mask_mod`` (not as facts): each ring step evaluates
    it on its block, on the masked Triton kernels."""
    lay = make_layout(layout_name, args.tokens_per_rank * world, world)
    q = rand(device, dtype, 1, args.heads, args.tokens_per_rank, args.head_dim).requires_grad_()
    k = rand(device, dtype, 1, args.kv_heads, args.tokens_per_rank, args.head_dim).requires_grad_()
    v = rand(device, dtype, 1, args.kv_heads, args.tokens_per_rank, args.head_dim).requires_grad_()
    dout = rand(device, dtype, *q.shape)
    docs = sequence_facts(args, lay.seq_len)[0]["document_ids"].to(device)
    fn = _documents_mask_mod(docs)
    return fwd_bwd(
        lambda q, k, v: ring_attention(q, k, v, enable_gqa=True, layout=lay, mask_mod=fn,
                                       mask_buffers=(docs,)),
        (q, k, v), dout,
    )  # fmt: skip


def flex_one_gpu(args, world, device, dtype):
    """flex_attention (compiled) on the whole sequence on this one device, the documents'
    block mask made once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S = args.tokens_per_rank * world
    docs = sequence_facts(args, S)[0]["document_ids"].to(device)
    block_mask = create_block_mask(_documents_mask_mod(docs), 1, None, S, S, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    q = rand(device, dtype, 1, args.heads, S, args.head_dim).requires_grad_()
    k = rand(device, dtype, 1, args.kv_heads, S, args.head_dim).requires_grad_()
    v = rand(device, dtype, 1, args.kv_heads, S, args.head_dim).requires_grad_()
    dout = rand(device, dtype, *q.shape)
    return fwd_bwd(
        lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True), (q, k, v), dout
    )


def torch_context_parallel_flex(args, world, device, dtype):
    """PyTorch's own route for packed documents: flex_attention (compiled) under
    context_parallel's flex style (each rank's queries over K/V all-gathered every call),
    load-balanced per document (head and tail of each document), the block mask made for the
    rank's queries (``_create_cp_block_mask``); K/V keep their KV heads (flex takes GQA). Private
    torch APIs: where this torch lacks them the row says so."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp
    from torch.distributed.tensor.experimental._context_parallel import _load_balancer
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention.flex_attention import flex_attention

    S = args.tokens_per_rank * world
    docs = sequence_facts(args, S)[0]["document_ids"].to(device)
    mesh = init_device_mesh(device.type, (world,))
    balancer = _load_balancer._PerDocumentHeadTailLoadBalancer(
        [torch.bincount(docs[0]).tolist()], world, device
    )
    block_mask = cp._create_cp_block_mask(_documents_mask_mod(docs), 1, 1, S, S, mesh, balancer)
    full = [rand(device, dtype, 1, args.heads, S, args.head_dim)]
    full += [rand(device, dtype, 1, args.kv_heads, S, args.head_dim) for _ in range(2)]
    full.append(rand(device, dtype, *full[0].shape))
    q, k, v, dout = cp._context_parallel_shard(mesh, full, [2, 2, 2, 2], balancer)
    compiled = torch.compile(flex_attention, dynamic=False)

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

    style = cp._ContextParallel(seq_dim=2, attention_type=cp._ContextParallel.AttentionType.FLEX)
    attend = parallelize_module(Attend(), mesh, style)
    return fwd_bwd(attend, tuple(t.detach().requires_grad_() for t in (q, k, v)), dout)


def seed(args, world, device, dtype):
    from ring_attention_pytorch import ring_flash_attn_cuda

    shape = (1, args.tokens_per_rank, args.heads, args.head_dim)
    kv_shape = (1, args.tokens_per_rank, args.kv_heads, args.head_dim)
    q = rand(device, dtype, *shape).requires_grad_()
    k = rand(device, dtype, *kv_shape).requires_grad_()
    v = rand(device, dtype, *kv_shape).requires_grad_()
    dout = rand(device, dtype, *shape)
    return fwd_bwd(
        lambda q, k, v: ring_flash_attn_cuda(q, k, v, None, True, 1024, True, True),
        (q, k, v), dout,
    )  # fmt: skip


def _union(intervals):
    """Merged, sorted, disjoint intervals."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(xs, ys) -> list:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append([a, b])
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def where_time_goes(fn, path, iters=3) -> dict:
    """Profile ``iters`` back-to-back calls; per call, ms of: the span from the first kernel's
    start to the last one's end, compute kernels, NCCL kernels, NCCL time under no compute, and
    idle GPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    comm, compute = [], []
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            iv = (e.time_range.start, e.time_range.end)
            (comm if "nccl" in e.name.lower() else compute).append(iv)
            name = e.name[:70]
            by_name[name] = by_name.get(name, 0.0) + iv[1] - iv[0]
    comm, compute = _union(comm), _union(compute)
    busy = _union(comm + compute)
    span = busy[-1][1] - busy[0][0]
    hidden = _length(_intersect(comm, compute))
    prof.export_chrome_trace(path)  # gzipped: the path ends in .gz
    us = 1e3 * iters
    return {
        "span_ms": span / us,
        "compute_ms": _length(compute) / us,
        "comm_ms": _length(comm) / us,
        "comm_hidden_ms": hidden / us,
        "comm_exposed_ms": (_length(comm) - hidden) / us,
        "idle_ms": (span - _length(busy)) / us,
        # the kernels that take the time, ms per call (attention, merges, adds, copies, NCCL)
        "kernels": {k: v / us for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]},
    }


def measure(rank, world, args):
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device, args)
    S = args.tokens_per_rank * world
    _, pairs = sequence_facts(args, S)
    flops = 3.5 * 4 * args.heads * pairs * args.head_dim  # the mask's pairs, fwd + bwd (2.5x fwd)
    rows = {}

    def record(name, fn):
        try:
            rows[name] = slowest(timer(fn), device)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if rank == 0:
            print(name, rows[name], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for kern in ("auto", "triton"):
        ideal_name = ideal_name_of(kern, args.mask)
        record(ideal_name, monolithic(args, world, device, dtype, kern))
        for key in ("ms", "call_ms"):
            if key in rows[ideal_name]:
                rows[ideal_name][key] /= world
    for kern in args.kernels:
        for name in args.layouts:
            label = f"ours {name}" + ("" if kern == "auto" else f", {kern} blocks")
            record(label, ours(name, args, world, device, dtype, kern))
            record(f"{label}, no communication",
                   ours_without_communication(name, args, world, device, dtype, kern))  # fmt: skip
    if args.mask == "documents":  # as a flex user writes it: a mask_mod, here and in torch
        record(f"ours {args.layouts[0]}, the documents as a mask_mod",
               ours_mask_mod(args.layouts[0], args, world, device, dtype))  # fmt: skip
        if device.type == "cuda" and not args.no_peers:
            record("flex, one GPU, whole sequence (time / W)",
                   flex_one_gpu(args, world, device, dtype))  # fmt: skip
            for key in ("ms", "call_ms"):
                if key in rows["flex, one GPU, whole sequence (time / W)"]:
                    rows["flex, one GPU, whole sequence (time / W)"][key] /= world
            try:
                record("torch context_parallel, flex (per-document balance)",
                       torch_context_parallel_flex(args, world, device, dtype))  # fmt: skip
            except Exception as e:  # (made before the timing: private torch APIs)
                rows["torch context_parallel, flex (per-document balance)"] = {
                    "error": f"{type(e).__name__}: {str(e)[:300]}"
                }
    if split_refusal(args.heads, args.kv_heads, world) is None:
        label = f"ours ulysses ({args.layouts[0]} layout)"
        record(label, ours(args.layouts[0], args, world, device, dtype, strategy="ulysses"))
        record("ours ulysses, no communication",
               ulysses_without_communication(args, world, device, dtype))  # fmt: skip
    if device.type == "cuda" and not args.no_peers and args.mask == "causal":
        try:
            run, ctx = torch_context_parallel(args, world, device, dtype)
            record("torch context_parallel", run)
            ctx.__exit__(None, None, None)
        except Exception as e:
            rows["torch context_parallel"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        try:
            record("seed striped", seed(args, world, device, dtype))
        except Exception as e:
            rows["seed striped"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if args.trace and device.type == "cuda":
        for name in args.layouts:
            path = os.path.join(args.out, f"trace_{name}_rank{rank}.json.gz")
            split = where_time_goes(ours(name, args, world, device, dtype), path)
            splits = [None] * world
            dist.all_gather_object(splits, split)
            if rank == 0:
                for r, sp in enumerate(splits):
                    print(
                        f"trace ours {name} rank {r}: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in sp.items() if k != "kernels"),
                        flush=True,
                    )
                    for kname, ms in sp["kernels"].items():
                        print(f"    {ms:7.3f} ms  {kname}", flush=True)
            rows[f"ours {name}"]["trace"] = splits
    ideal = rows[ideal_name_of("auto", args.mask)]
    for r in rows.values():
        if "ms" in r:
            r["efficiency"] = ideal["ms"] / r["ms"]
            r["call_efficiency"] = ideal["call_ms"] / r["call_ms"]
            r["tflops_per_rank"] = flops / world / r["ms"] * 1e-9
    return rows, device


def report(rows, world, args, device):
    head = (f"W={world}, {args.tokens_per_rank} tokens per rank ({args.tokens_per_rank * world} in all), "
            f"H={args.heads} Hkv={args.kv_heads} D={args.head_dim}, {MASK_NAMES[args.mask]}, "
            "fwd+bwd")  # fmt: skip
    if device.type == "cuda":
        head += (f"; {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                 f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")  # fmt: skip
    lines = [
        head,
        "",
        "| implementation | ms (slowest rank) | TFLOP/s per rank | % of ideal "
        "| one call from idle: ms | % of ideal |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "ms" in r:
            lines.append(
                f"| {name} | {r['ms']:.2f} | {r['tflops_per_rank']:.0f} | "
                f"{100 * r['efficiency']:.1f} % | {r['call_ms']:.2f} | "
                f"{100 * r['call_efficiency']:.1f} % |"
            )
        else:
            lines.append(f"| {name} | {r['error']} | | | | |")
    text = "\n".join(lines)
    print(text, flush=True)
    save_run(
        args.out,
        f"bench_ring_w{world}{args.tag}",
        {"setup": head, "rows": rows},
        lambda: plot(args.out, args.tag),
    )


PLOTTED = ["ours striped", "ours zigzag", "ours striped, triton blocks",
           "ours zigzag, triton blocks", "torch context_parallel", "seed striped"]  # fmt: skip


def plot(directory: str, tag: str = "") -> None:
    """``bench_ring.png`` in ``directory``: % of ideal per implementation for every ring size
    whose ``bench_ring_w<W><tag>.json`` is there."""
    import glob
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for path in glob.glob(os.path.join(directory, f"bench_ring_w*{tag}.json")):
        found = re.fullmatch(rf"bench_ring_w(\d+){re.escape(tag)}\.json", os.path.basename(path))
        if found:
            with open(path) as f:
                runs[int(found.group(1))] = json.load(f)
    worlds = sorted(runs)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(PLOTTED)
    for i, name in enumerate(PLOTTED):
        got = [runs[w]["rows"].get(name, {}) for w in worlds]
        vals = [100 * r.get("efficiency", float("nan")) for r in got]
        bars = ax.bar([x + (i - (len(PLOTTED) - 1) / 2) * width for x in range(len(worlds))], vals,
                      width, label=name)  # fmt: skip
        # the ms too: the ideal moves from run to run, the ranking of the rows does not
        ax.bar_label(bars, [f"{v:.0f}\n{r['ms']:.2f} ms" if "ms" in r else "" for v, r in
                            zip(vals, got)], fontsize=6)  # fmt: skip
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(worlds)), [f"W = {w}" for w in worlds])
    ax.set_ylabel("% of ideal (cuDNN on one GPU, whole sequence / W)")
    ax.set_ylim(0, 118)
    setup = re.sub(r"^W=\d+, | \(\d+ in all\)", "", runs[worlds[-1]]["setup"]) if worlds else ""
    ax.set_title("real ring, calls back to back: " + setup.replace("; ", "\n"), fontsize=8)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "bench_ring.png"), dpi=120)


def _worker(rank, world, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    _main(args)


def _main(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, device = measure(rank, world, args)
    if rank == 0:
        report(rows, world, args, device)
    dist.barrier()
    dist.destroy_process_group()


def main():
    args = _parse()
    if args.replot:
        plot(args.replot, args.tag)
        return
    if "RANK" in os.environ:  # torchrun
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group(
                "nccl",
                device_id=torch.device("cuda", local),
                pg_options=nccl_options(args.nccl_high_priority),
            )
        else:
            dist.init_process_group("gloo")
        _main(args)
    else:
        fd, init_file = tempfile.mkstemp()
        os.close(fd)
        os.unlink(init_file)
        mp.spawn(_worker, args=(args.world_size, init_file, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
