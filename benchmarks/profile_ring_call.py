"""Where one ring call's time goes: ``ring_attention`` at W = 1 on a masked sequence, fwd+bwd,
under ``torch.profiler``: the wall time a call, the GPU's busy time (the kernels' sum) and so
the time the GPU idles waiting for the host, then the kernels' table sorted by GPU time.

1 × 32/8 heads × 8,192 × 128, bf16, q/k/v laid out (B, S, H, D) as a model's projections give
them, the output read back as transformers reads it (``out.transpose(1, 2).reshape(B, S, H * D)``).
Masks (``--mask``): eight documents of ~1k tokens (causal), a window of 1,024, chunks of 1,024,
left padding of 1/8 of the keys. "host" is the host's time to issue one call while the GPU is
still busy with earlier ones (three calls issued back to back, no wait). ``--kernels triton``
runs every block on our Triton kernels. The leaves' gradients accumulate over the steps (three
adds a step in the table: ``AccumulateGrad``), which is the harness, not the ring.

    PYTHONPATH=. python benchmarks/profile_ring_call.py [--mask documents|window|chunks|padding]
        [--kernels auto|triton] [--table]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ringcompile import ring_attention

B, H, Hkv, S, D = 1, 32, 8, 8192, 128


def mask_kwargs(kind: str) -> dict:
    if kind == "documents":
        lens = [1024 + 37 * i for i in range(8)]
        lens[-1] = S - sum(lens[:-1])
        doc = torch.repeat_interleave(torch.arange(8), torch.tensor(lens)).cuda()[None]
        return {"document_ids": doc}
    if kind == "window":
        return {"window": (1023, 0)}
    if kind == "chunks":
        return {"chunk": 1024}
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    valid[:, : S // 8] = False
    return {"key_padding_mask": valid}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--mask", default="documents", choices=["documents", "window", "chunks", "padding"]
    )
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton"])
    ap.add_argument("--table", action="store_true", help="print the kernels' table")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    q = r(B, S, H, D).transpose(1, 2).requires_grad_()
    k = r(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    v = r(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    kw = mask_kwargs(args.mask)

    def step():
        out = ring_attention(q, k, v, is_causal=True, layout="striped", enable_gqa=True,
                             kernels=args.kernels, **kw)  # fmt: skip
        o = out.transpose(1, 2).reshape(B, S, H * D)
        torch.autograd.backward(o, o.detach())

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 50 * 1e3
    # the host's time to issue a call: a few calls issued with no wait (the GPU still busy)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        step()
    host = (time.perf_counter() - t) / 3 * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    busy = sum(e.device_time for e in p.events() if e.device_type.name == "CUDA") / 10 / 1e3
    print(f"ring_attention, {args.mask}, kernels={args.kernels}, W = 1, fwd+bwd: "
          f"wall {wall:.3f} ms a call, GPU busy {busy:.3f} ms, idle {max(wall - busy, 0):.3f} ms, "
          f"host {host:.3f} ms")  # fmt: skip
    if args.table:
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                     max_name_column_width=60))  # fmt: skip


if __name__ == "__main__":
    main()
