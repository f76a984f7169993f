"""The host's time in one ring call at W = 1: what Python costs around the kernels.

On shapes so small (1 × 2/1 heads × 64 tokens × 8) that each kernel takes a few microseconds,
the wall time of a call is the host's. Per mask (causal, documents, window, chunks), microseconds
a call, the best of 7 rounds of 300 calls:

- "forward op" / "backward op": ``torch.ops.ringcompile.ring_attention`` and its backward op,
  as a compiled graph calls them (no autograd around them);
- "ring_forward" / "ring_backward": the schedules inside them (no ``torch.library`` dispatch);
- and, once, the plain kernel's own forward and backward on the whole block (causal), the floor.

``--kernels triton`` sends every block to the Triton kernels (GPU), whose host side (tile lists,
the mask's arguments, the launches) the default route leaves out for plain, documents and chunks.

    PYTHONPATH=. python benchmarks/bench_host.py [--device cpu|cuda] [--kernels auto|triton]
"""

from __future__ import annotations

import argparse
import time

import torch

from ringcompile.kernels import select_kernels
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.ring.backward import ring_backward
from ringcompile.ring.call import RankCall
from ringcompile.ring.forward import ring_forward

B, H, Hkv, S, D = 1, 2, 1, 64, 8
SCALE = D**-0.5


def best_us(fn, n: int = 300, rounds: int = 7) -> float:
    for _ in range(20):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = float("inf")
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def masks(device) -> dict[str, AttentionMask]:
    doc = torch.repeat_interleave(torch.arange(4, device=device), S // 4)[None]
    return {
        "causal": AttentionMask(PositionRules(True)),
        "documents": AttentionMask(PositionRules(True), document_ids=doc),
        "window": AttentionMask(PositionRules(True, window_left=15)),
        "chunks": AttentionMask(PositionRules(True, chunk=16)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton"])
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def token_major(h):  # (B, S, H, D) memory viewed (B, H, S, D), as a model's projections
        return torch.randn(B, S, h, D, device=device, dtype=dtype, generator=g).transpose(1, 2)

    q, k, v = token_major(H), token_major(Hkv), token_major(Hkv)
    print(f"{device.type}, torch {torch.__version__}; microseconds a call (W = 1, "
          f"{B} x {H}/{Hkv} heads x {S} x {D}, {dtype}, kernels={args.kernels})")  # fmt: skip
    # the floor: the plain kernel's own forward and backward on the whole block, causal
    plain = select_kernels(q).plain
    kq, kk, kv = q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    o, lse0 = plain.forward(kq, kk, kv, True, SCALE)
    do = torch.randn_like(o)
    floor = (best_us(lambda: plain.forward(kq, kk, kv, True, SCALE)),
             best_us(lambda: plain.backward(do, kq, kk, kv, o, lse0, True, SCALE)))  # fmt: skip
    print(f"{plain.name} alone on the block: forward {floor[0]:.0f}, backward {floor[1]:.0f}")
    print("| mask | forward op | backward op | ring_forward | ring_backward |")
    print("|---|---:|---:|---:|---:|")
    for name, mask in masks(device).items():
        options = (*mask.encode(), SCALE, "striped", S, "", args.kernels)
        out, lse = torch.ops.ringcompile.ring_attention(q, k, v, *options)
        dout = torch.randn_like(out)

        def call():
            return RankCall.make(q, mask, "striped", S, "", args.kernels)

        row = [
            best_us(lambda: torch.ops.ringcompile.ring_attention(q, k, v, *options)),
            best_us(
                lambda: torch.ops.ringcompile.ring_attention_backward(
                    dout, q, k, v, out, lse, *options
                )
            ),  # fmt: skip
            best_us(lambda: ring_forward(call(), q, k, v, SCALE)),
            best_us(lambda: ring_backward(call(), dout, q, k, v, out, lse, SCALE)),
        ]
        print(f"| {name} | " + " | ".join(f"{x:.0f}" for x in row) + " |", flush=True)


if __name__ == "__main__":
    main()
