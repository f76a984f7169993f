"""Where one ring call's GPU time goes: ``ring_attention`` at W = 1 on packed documents, fwd+bwd,
under ``torch.profiler``, the kernels' table sorted by GPU time.

1 × 32/8 heads × 8,192 × 128, bf16, q/k/v laid out (B, S, H, D) as a model's projections give
them, the output read back as transformers reads it (``out.transpose(1, 2).reshape(B, S, H * D)``),
eight documents of ~1k tokens. The leaves' gradients accumulate over the steps (three adds a step
in the table: ``AccumulateGrad``), which is the harness, not the ring.

    PYTHONPATH=. python benchmarks/profile_ring_call.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from ringcompile import ring_attention

B, H, Hkv, S, D = 1, 32, 8, 8192, 128


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    q = r(B, S, H, D).transpose(1, 2).requires_grad_()
    k = r(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    v = r(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    lens = [1024 + 37 * i for i in range(8)]
    lens[-1] = S - sum(lens[:-1])
    doc = torch.repeat_interleave(torch.arange(8), torch.tensor(lens)).cuda()[None]

    def step():
        out = ring_attention(q, k, v, is_causal=True, document_ids=doc, layout="striped",
                             enable_gqa=True)  # fmt: skip
        o = out.transpose(1, 2).reshape(B, S, H * D)
        torch.autograd.backward(o, o.detach())

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    print(
        f"ring_attention, documents, W = 1, fwd+bwd: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms"
    )
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
