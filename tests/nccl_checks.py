"""Exactness on real GPUs over NCCL, one rank per GPU: run by ``test_multi_gpu.py`` as

    torchrun --nproc-per-node W tests/nccl_checks.py

1. ``ring_attention`` (P2P over NCCL) for every layout, causal GQA (its plain blocks on cuDNN by
   default, and with ``kernels="triton"``), causal with key padding that hides nothing (dropped
   by the ring) and a mixed mask (sliding window + documents + key padding: Triton), bf16 and
   fp32, forward and backward. Bound:
   bf16 relative error to an fp64 reference on the whole sequence at most 1.5x that of SDPA's
   memory-efficient backend on the same bf16 inputs (the kernel tests' bound); fp32 (TF32 dots)
   below 5e-3.
2. Ranks that disagree on shapes raise on every rank, and the group works afterwards.
3. A small transformer compiled with ``backend="ring"`` (inductor) in fp32 against the same model
   uncompiled on one GPU: logits and every parameter gradient, relative error below 5e-3.

Every rank prints its worst errors; any failure exits non-zero.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringcompile import make_layout, ring_attention
from ringcompile.testing_models import TinyTransformer


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def mask_case(kind, B, S, device, gen):
    """(ring_attention kwargs, dense (B, 1, S, S) boolean mask of the same rule)."""
    pos = torch.arange(S, device=device)
    if kind == "causal":
        return {"is_causal": True}, (pos[None, :] <= pos[:, None])[None, None]
    if kind == "idle padding":  # a tokenizer's all-ones mask: the ring drops it (plain blocks)
        valid = torch.ones(B, S, dtype=torch.bool, device=device)
        causal = (pos[None, :] <= pos[:, None])[None, None]
        return {"is_causal": True, "key_padding_mask": valid}, causal
    docs = torch.cumsum(torch.rand(B, S, generator=gen, device=device) < 0.01, 1)
    valid = torch.rand(B, S, generator=gen, device=device) > 0.1
    window = (200, 0)
    dense = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window[0])
    dense = dense[None, None] & (docs[:, None, :, None] == docs[:, None, None, :])
    dense = dense & valid[:, None, None, :]
    kw = {"is_causal": True, "window": window, "document_ids": docs, "key_padding_mask": valid}
    return kw, dense


def check_ring_attention(rank, world, device) -> list[str]:
    failures = []
    B, H, Hkv, S, D = 2, 8, 2, 1024 * world, 128
    gen = torch.Generator(device=device).manual_seed(0)
    full = [torch.randn(B, n, S, D, generator=gen, device=device) for n in (H, Hkv, Hkv, H)]
    for kind in ("causal", "idle padding", "mixed"):
        kw, dense = mask_case(kind, B, S, device, gen)
        # fp64 reference on the whole sequence (rows with no key are 0, as the math backend)
        q64, k64, v64 = (t.double().requires_grad_() for t in full[:3])
        seen = dense.any(-1, keepdim=True)
        ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=dense | ~seen,
                                             enable_gqa=True) * seen  # fmt: skip
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), full[3].double())
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v, dout = (t.to(dtype) for t in full)
            sdpa_errs = None
            if dtype == torch.bfloat16:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                G = H // Hkv
                qs, ks, vs = (
                    t.detach().requires_grad_()
                    for t in (q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
                )
                bias = torch.zeros(dense.shape, device=device, dtype=dtype)
                bias = bias.masked_fill(~(dense | ~seen), float("-inf")).expand(B, H, S, S)
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias.contiguous())
                o = o * seen
                gq, gk, gv = torch.autograd.grad(o, (qs, ks, vs), dout)
                gk = gk.unflatten(1, (Hkv, G)).sum(2)
                gv = gv.unflatten(1, (Hkv, G)).sum(2)
                sdpa_errs = [rel(x, r) for x, r in zip((o, gq, gk, gv), (ref, *ref_grads))]
            # (strategy, kernels): Ulysses on the fastest kernels only
            choices = [("ring", "auto"), ("ulysses", "auto")]
            if kind == "causal" and dtype == torch.bfloat16:
                choices.append(("ring", "triton"))
            for name, (strategy, kernels) in (
                (n, c) for n in ("contiguous", "striped", "zigzag") for c in choices
            ):
                lay = make_layout(name, S, world)
                local = [lay.shard(t, 2, rank).detach().requires_grad_() for t in (q, k, v)]
                kw_local = dict(kw)
                for key in ("document_ids", "key_padding_mask"):
                    if key in kw_local:
                        kw_local[key] = lay.shard(kw_local[key], 1, rank)
                out = ring_attention(*local, enable_gqa=True, layout=lay, kernels=kernels,
                                     strategy=strategy, **kw_local)  # fmt: skip
                grads = torch.autograd.grad(out, local, lay.shard(dout, 2, rank))
                want = [lay.shard(t, 2, rank) for t in (ref, *ref_grads)]
                errs = [rel(x, r) for x, r in zip((out, *grads), want)]
                tag = f"rank {rank} {kind} {name} {dtype} {strategy} {kernels}"
                print(tag, " ".join(f"{n}={e:.2e}" for n, e in zip(("out", "dq", "dk", "dv"), errs)),
                      "" if sdpa_errs is None else
                      "sdpa " + " ".join(f"{e:.2e}" for e in sdpa_errs), flush=True)  # fmt: skip
                bounds = ([1.5 * e + 1e-6 for e in sdpa_errs] if sdpa_errs is not None
                          else [5e-3] * 4)  # fmt: skip
                for n, e, b in zip(("out", "dq", "dk", "dv"), errs, bounds):
                    if not e <= b:
                        failures.append(f"{tag}: {n} error {e:.2e} above {b:.2e}")
    return failures


def check_disagreement_raises(rank, world, device) -> list[str]:
    """Ranks holding different numbers of tokens: a clear error on every rank, then the group
    still works (the agreement all-gather runs on a side stream over NCCL)."""
    q = torch.randn(1, 4, 128 + 128 * rank, 64, device=device, dtype=torch.bfloat16)
    try:
        ring_attention(q, q, q)
        failures = [f"rank {rank}: mismatched local lengths did not raise"]
    except ValueError as e:
        failures = [] if "local sequence length" in str(e) else [f"rank {rank}: wrong error {e}"]
    q = torch.randn(1, 4, 128, 64, device=device, dtype=torch.bfloat16)
    out = ring_attention(q, q, q, is_causal=True)
    torch.cuda.synchronize()
    if not out.isfinite().all():
        failures.append(f"rank {rank}: ring after the error returned non-finite values")
    return failures


def check_compiled_model(rank, world, device) -> list[str]:
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer(vocab=256, dim=256, heads=8, kv_heads=2, layers=2, max_len=4096).to(
        device
    )
    tokens = torch.randint(0, 256, (2, 512 * world), device=device)
    w = torch.randn(2, 512 * world, 256, device=device)
    ref = model(tokens)
    (ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="ring", options={"layout": "zigzag"})
    out = compiled(tokens)
    (out * w).sum().backward()
    errs = {"logits": rel(out.detach(), ref.detach())}
    errs.update({n: rel(p.grad, ref_grads[n]) for n, p in model.named_parameters()})
    worst = max(errs, key=errs.get)
    print(f"rank {rank} compiled model: worst {worst} {errs[worst]:.2e}", flush=True)
    return [f"rank {rank} compiled {n}: {e:.2e}" for n, e in errs.items() if not e < 5e-3]


def main():
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    for check in (check_ring_attention, check_disagreement_raises, check_compiled_model):
        failures += check(rank, world, device)
    for f in failures:
        print("FAIL", f, flush=True)
    flag = torch.tensor([len(failures)], device=device)
    dist.all_reduce(flag)
    dist.destroy_process_group()
    sys.exit(1 if flag.item() else 0)


if __name__ == "__main__":
    main()
