"""Whether cuDNN's ragged (``cum_seq``) attention could take packed-document blocks: torch's
``aten._cudnn_attention_forward`` on the documents' ``cu_seqlens`` against FA2's varlen kernel
(what the ring runs them on), one GPU.

For each draw of documents in 8,192 tokens (1 × 32/8 heads, d 128, bf16, causal inside each
document) it prints FA2 varlen's forward and forward + backward; cuDNN ragged's first call, its
output against FA2's, its forward and forward + backward (backward through torch's autograd
formula), its gradients against FA2's, with K/V grouped and expanded to the query heads; cuDNN's
plain causal kernel on the whole sequence (the work's ideal: that time x density / 0.5); then
which causal diagonal cuDNN aligns where a document has more keys than queries (FA2 aligns it
bottom-right, which the ring's blocks need). Times are means of 50 calls after 3.

    PYTHONPATH=. python benchmarks/bench_cudnn_ragged.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

S, H, Hkv, D = 8192, 32, 8, 128
SCALE = D**-0.5
DEV = "cuda"


def timed(fn, n: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def documents(mean_len: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(cu_seqlens int32, longest, lengths)`` of random documents (None: one document)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    if mean_len is None:
        ids = torch.zeros(S, dtype=torch.long, device=DEV)
    else:
        ids = torch.cumsum(torch.rand(1, S, generator=g, device=DEV) < 1 / mean_len, 1)[0]
    lengths = torch.bincount(ids - ids[0])
    lengths = lengths[lengths > 0]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=DEV)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max()), lengths


def worst(a, b) -> str:
    return f"{(a.float() - b.float()).abs().max().item():.2e}"


def compare(mean_len: int | None) -> None:
    cu, longest, lengths = documents(mean_len)
    density = float((lengths.double() * (lengths + 1) / 2).sum() / (S * S))
    print(f"== {len(lengths)} documents, longest {longest}, density {density:.4f}", flush=True)
    q = torch.randn(S, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(S, Hkv, D, device=DEV, dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    rng, unused = torch.zeros(2, dtype=torch.uint64, device=DEV), torch.empty(0, device=DEV)

    def fa2_forward():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0,
                                                       True, False, scale=SCALE)  # fmt: skip

    def fa2_backward(out, lse):
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu, cu, longest, longest, 0.0, True, rng, unused, scale=SCALE
        )

    out2, lse2, *_ = fa2_forward()
    grads2 = fa2_backward(out2, lse2)
    print(f"FA2 varlen: fwd {timed(fa2_forward):.3f} ms, fwd+bwd "
          f"{timed(lambda: fa2_backward(*fa2_forward()[:2])):.3f} ms", flush=True)  # fmt: skip
    for grouped in (True, False):
        kk, vv = (t if grouped else t.repeat_interleave(H // Hkv, 1) for t in (k, v))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, kk, vv))

        def cudnn_forward():
            return torch.ops.aten._cudnn_attention_forward(
                qg, kg, vg, None, cu, cu, longest, longest, True, 0.0, True, False, scale=SCALE
            )[0]

        def cudnn_fwd_bwd():
            return torch.autograd.grad(cudnn_forward(), (qg, kg, vg), dout)

        name = "K/V grouped" if grouped else "K/V expanded"
        try:
            t = time.perf_counter()
            out = cudnn_forward()
            torch.cuda.synchronize()
            first = (time.perf_counter() - t) * 1e3
            with torch.no_grad():
                forward = timed(cudnn_forward)
            both = timed(cudnn_fwd_bwd)
            dq, dk, dv = cudnn_fwd_bwd()
            if not grouped:
                dk, dv = (t.view(S, Hkv, H // Hkv, D).sum(2) for t in (dk, dv))
            print(f"cuDNN ragged, {name}: first call {first:.0f} ms; out vs FA2 "
                  f"{worst(out, out2)}; fwd {forward:.3f} ms, fwd+bwd {both:.3f} ms; "
                  f"dq, dk, dv vs FA2 {worst(dq, grads2[0])}, {worst(dk, grads2[1])}, "
                  f"{worst(dv, grads2[2])}", flush=True)  # fmt: skip
        except RuntimeError as e:
            print(f"cuDNN ragged, {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    qd, kd, vd = (t.transpose(0, 1)[None].clone().requires_grad_() for t in (q, k, v))

    def plain_causal():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, (qd, kd, vd), dout.transpose(0, 1)[None])

    plain = timed(plain_causal, 20)
    print(f"cuDNN plain causal, whole sequence: fwd+bwd {plain:.3f} ms; work's ideal "
          f"{plain * density / 0.5:.3f} ms", flush=True)  # fmt: skip


def alignment() -> None:
    """Queries: the second half of each document; keys: all of it."""
    cu, longest, lengths = documents(1024)
    half = lengths // 2
    cu_q = torch.zeros_like(cu)
    cu_q[1:] = half.cumsum(0)
    q = torch.randn(int(half.sum()), H, D, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(S, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    args = (cu_q, cu, int(half.max()), longest)
    fa2 = torch.ops.aten._flash_attention_forward(q, k, v, *args, 0.0, True, False, scale=SCALE)
    cudnn = torch.ops.aten._cudnn_attention_forward(q, k, v, None, *args, True, 0.0, True, False,
                                                    scale=SCALE)  # fmt: skip
    top_left = []
    for i in range(len(lengths)):
        rows = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]
        keys, values = (t[cu[i] : cu[i + 1]].transpose(0, 1)[None] for t in (k, v))
        seen = torch.ones(rows.shape[2], keys.shape[2], dtype=torch.bool, device=DEV).tril()
        top_left.append(F.scaled_dot_product_attention(rows, keys, values, attn_mask=seen,
                                                       scale=SCALE)[0].transpose(0, 1))  # fmt: skip
    print(f"== more keys than queries: cuDNN vs FA2 (bottom-right) {worst(cudnn[0], fa2[0])}, "
          f"vs top-left {worst(cudnn[0], torch.cat(top_left))}", flush=True)  # fmt: skip


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)  # fmt: skip
    for mean_len in (1024, 4096, None):
        compare(mean_len)
    alignment()


if __name__ == "__main__":
    main()
