"""cuDNN on chunked attention's blocks, as the block engine calls it (``engine.ChunkBatch``): the
8 chunks of 1,024 tokens of an 8,192-token sequence as one batch of causal squares, K/V grouped
(8 heads) or expanded to the 32 query heads, inputs laid out (B, S, H, D) as a model's projections
give them or (B, H, S, D) (at B = 1 the batch is a view of either, with other strides); against
cuDNN on one chunk alone and on the whole sequence's causal square. bf16, d 128, ms per call,
means of 30 calls after 3, one GPU.

    PYTHONPATH=. python benchmarks/bench_chunks.py
"""

from __future__ import annotations

import torch
from bench_cudnn_ragged import timed  # (a script's folder is on its path)

from ringcompile.kernels.sdpa_blocks import CudnnBlocks

S, H, Hkv, D, CHUNK = 8192, 32, 8, 128, 1024
SCALE = D**-0.5


def inputs(heads: int, token_major: bool) -> torch.Tensor:
    x = torch.randn(1, S, heads, D, device="cuda", dtype=torch.bfloat16)
    return x.transpose(1, 2) if token_major else x.transpose(1, 2).contiguous()


def batched(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(2, (-1, CHUNK)).transpose(1, 2).flatten(0, 1)


def fwd_bwd(cudnn: CudnnBlocks, q, k, v, dout) -> tuple[float, float]:
    out, lse = cudnn.forward(q, k, v, True, SCALE)
    return (timed(lambda: cudnn.forward(q, k, v, True, SCALE), 30),
            timed(lambda: cudnn.backward(dout, q, k, v, out, lse, True, SCALE), 30))  # fmt: skip


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)  # fmt: skip
    cudnn = CudnnBlocks()
    print("| inputs | K/V | fwd ms | bwd ms |\n|---|---|---:|---:|")
    for token_major in (True, False):
        for grouped in (True, False):
            q, k, v, dout = inputs(H, token_major), inputs(Hkv, token_major), \
                inputs(Hkv, token_major), inputs(H, token_major)  # fmt: skip
            if not grouped:
                k, v = (t.repeat_interleave(H // Hkv, 1) for t in (k, v))
            f, b = fwd_bwd(cudnn, *map(batched, (q, k, v, dout)))
            layout = "(B, S, H, D)" if token_major else "(B, H, S, D)"
            print(f"| {layout} | {'grouped' if grouped else 'expanded'} | {f:.3f} | {b:.3f} |",
                  flush=True)  # fmt: skip
    q, k, v, dout = inputs(H, True), inputs(Hkv, True), inputs(Hkv, True), inputs(H, True)
    f, b = fwd_bwd(cudnn, *(t[:, :, :CHUNK] for t in (q, k, v, dout)))
    print(f"| one chunk alone (x {S // CHUNK}) | grouped | {f:.3f} | {b:.3f} |")
    f, b = fwd_bwd(cudnn, q, k, v, dout)
    print(f"| the whole sequence, causal | grouped | {f:.3f} | {b:.3f} |")


if __name__ == "__main__":
    main()
