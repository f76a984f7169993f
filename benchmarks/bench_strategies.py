"""Ring, Ulysses or two levels, per mask, on one GPU: each strategy's compute for one rank of a
virtual group of W, without its communication, against one GPU's time on the whole sequence / W.

For W = 2, 4, 8 (``--tokens-per-rank`` tokens a rank), Llama-3-8B heads (32 / 8, D 128), bf16,
forward + backward, masks causal, packed documents (~1k tokens each, ``bench_ring.py``'s draw) and
a causal window of 1024:

- ring: each rank's schedule and kernels on a ring that sends nothing (``LocalRing``: a step's
  keys are the rank's own, positions the source's), the slowest rank; its K/V transfers are
  assumed hidden, so this is the ring at its best;
- ulysses: one rank's attention over the whole sequence for its H/W query heads, with the
  reordering into and out of natural order (a group of one), plus its all-to-alls estimated from
  their bytes at ``--link-gbs`` (an assumed all-to-all bandwidth per rank and direction, not a
  measurement: ``bench_ring.py`` times the real ones on W GPUs);
- two levels (``--heads-groups U``, U ranks a head group, a ring of R = W / U groups): the slowest
  ring rank's schedule for H/U query heads over U × the tokens a rank, plus the all-to-alls inside
  the group at ``--link-gbs``; the ring's transfers assumed hidden, as for the ring;
- one GPU / W: ``ring_attention`` on the whole sequence, all heads, on one GPU, divided by W.

    PYTHONPATH=. python benchmarks/bench_strategies.py [--out DIR] [--link-gbs 200]
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
from saving import save_run

from ringcompile import ring_attention
from ringcompile.layout import make_layout
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.ring import LocalRing, RankCall
from ringcompile.ring.backward import ring_backward
from ringcompile.ring.forward import ring_forward
from ringcompile.ulysses import HeadSplit

MASKS = ("causal", "documents", "window")


def facts(mask: str, S: int) -> dict:
    """``ring_attention``'s mask arguments for the whole sequence (B = 1)."""
    if mask == "documents":
        g = torch.Generator().manual_seed(1)
        return {"document_ids": torch.cumsum(torch.rand(1, S, generator=g) < 1 / 1024, 1)}
    if mask == "window":
        return {"window": (1023, 0)}
    return {}


def attention_mask(kw: dict, device, pos=None) -> AttentionMask:
    docs = kw.get("document_ids")
    if docs is not None:
        docs = (docs[:, pos] if pos is not None else docs).to(device)
    return AttentionMask(PositionRules.of(True, kw.get("window")), document_ids=docs)


def timed(fn, args) -> float:
    if args.device == "cpu":
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def rand(args, *shape, grad=False):
    t = torch.randn(*shape, device=args.device, dtype=args.dtype)
    return t.requires_grad_() if grad else t


def ring_rank(args, W: int, rank: int, kw: dict, heads=None, kv_heads=None, L=None):
    """Rank ``rank``'s part of a striped ring of W (L tokens a rank, these heads), sending
    nothing."""
    L, D = L or args.tokens_per_rank, args.head_dim
    lay = make_layout("striped", L * W, W)
    q = rand(args, 1, heads or args.heads, L, D)
    k, v = (rand(args, 1, kv_heads or args.kv_heads, L, D) for _ in range(2))
    dout = rand(args, *q.shape)
    mask = attention_mask(kw, args.device, lay.positions(rank))
    ring, scale = LocalRing(rank, W), D**-0.5

    def run():
        out, lse = ring_forward(RankCall.on(ring, q, mask, lay, "auto"), q, k, v, scale)
        ring_backward(RankCall.on(ring, q, mask, lay, "auto"), dout, q, k, v, out, lse, scale)

    return run


def whole(args, heads: int, kv_heads: int, S: int, kw: dict, strategy: str):
    """``ring_attention`` over the whole sequence on this device (no group)."""
    D = args.head_dim
    q = rand(args, 1, heads, S, D, grad=True)
    k, v = (rand(args, 1, kv_heads, S, D, grad=True) for _ in range(2))
    dout = rand(args, *q.shape)
    local = {n: t.to(args.device) if torch.is_tensor(t) else t for n, t in kw.items()}

    def run():
        out = ring_attention(q, k, v, is_causal=True, enable_gqa=True, strategy=strategy, **local)
        torch.autograd.grad(out, (q, k, v), dout)

    return run


def all_to_all_bytes(args, W: int) -> int:
    """Bytes one rank sends in Ulysses' all-to-alls of a forward and backward over W ranks: q,
    out, dout and dq by query heads; k, v, dk and dv by the KV heads each other rank uses."""
    split = HeadSplit.of(args.heads, args.kv_heads, W)
    token = args.tokens_per_rank * args.head_dim * args.dtype.itemsize
    by_q = 4 * split.q_per_rank * (W - 1) * token
    by_kv = 4 * split.kv_per_rank * (W - 1) * token
    return by_q + by_kv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument(
        "--heads-groups",
        type=int,
        nargs="*",
        default=[2],
        help="U for the two-level rows (W / U ring ranks), where U < W divides W",
    )
    p.add_argument("--link-gbs", type=float, default=200.0,
                   help="assumed all-to-all bandwidth per rank and direction, GB/s")  # fmt: skip
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for W in args.worlds:
        S = args.tokens_per_rank * W
        for mask in args.masks:
            kw = facts(mask, S)
            ring = max(timed(ring_rank(args, W, r, kw), args) for r in range(W))
            split = HeadSplit.of(args.heads, args.kv_heads, W)
            compute = timed(whole(args, split.q_per_rank, split.kv_per_rank, S, kw, "ulysses"),
                            args)  # fmt: skip
            a2a = all_to_all_bytes(args, W) / (args.link_gbs * 1e6)
            alone = timed(whole(args, args.heads, args.kv_heads, S, kw, "ring"), args) / W
            row = dict(world=W, mask=mask, ring_ms=ring, ulysses_compute_ms=compute,
                       ulysses_a2a_ms=a2a, ulysses_ms=compute + a2a, one_gpu_over_w_ms=alone)  # fmt: skip
            two = ""
            for U in (u for u in args.heads_groups if u < W and W % u == 0):
                R, inner = W // U, HeadSplit.of(args.heads, args.kv_heads, U)
                L = args.tokens_per_rank * U
                step = max(timed(ring_rank(args, R, r, kw, inner.q_per_rank, inner.kv_per_rank, L),
                                 args) for r in range(R))  # fmt: skip
                row[f"two_level_u{U}_ms"] = step + all_to_all_bytes(args, U) / (args.link_gbs * 1e6)
                two += f" | two levels {U}x{R} {row[f'two_level_u{U}_ms']:7.3f} ms"
            rows.append(row)
            print(f"W={W} {mask:9s} ring {ring:7.3f} ms | ulysses {compute:7.3f} + a2a "
                  f"{a2a:6.3f} = {compute + a2a:7.3f} ms{two} | one GPU / W {alone:7.3f} ms",
                  flush=True)  # fmt: skip
            if args.device == "cuda":
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    head = dict(device=device, torch=torch.__version__, link_gbs=args.link_gbs,
                tokens_per_rank=args.tokens_per_rank, heads=args.heads, kv_heads=args.kv_heads,
                head_dim=args.head_dim)  # fmt: skip
    save_run(args.out, "bench_strategies", {"setup": head, "rows": rows}, lambda: None)


if __name__ == "__main__":
    main()
