"""Attention kernels side by side on one GPU: ours (one rank, whole sequence) against SDPA's cuDNN,
flash and memory-efficient backends and the seed package (ring-attention-pytorch's Triton kernel).

"ours" is what the ring op runs by default (``kernels="auto"``: a plain full or causal block on
cuDNN through the block engine, with the engine's overheads); "ours-triton" is our Triton kernel
on the same block (``kernels="triton"``), the kernel masked blocks run on.

TFLOP/s count 4*B*H*S^2*D per forward (x1/2 causal) and 2.5x that for the backward; medians of
triton.testing.do_bench over 0.3 s (1.2 s at 32k tokens) after a warm-up of half that. SDPA gets
K/V already expanded to the query heads (repeat_interleave, outside the timed region); ours and
the seed read the grouped K/V. Ours' forward is forward_init + forward_step(last=True) +
forward_finish; its backward is backward_prepare plus one backward_step into a zeroed fp32 dQ
(the zeroing is timed too) and fresh dK/dV it overwrites (``dkv_fresh``), as the op makes on
one rank.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--out DIR] [--sweep] [--only ours,cudnn,...]
    PYTHONPATH=. python benchmarks/bench_kernels.py --masks [--out DIR]
    PYTHONPATH=. python benchmarks/bench_kernels.py --blocks [--out DIR]
    PYTHONPATH=. python benchmarks/bench_kernels.py --sweep-masks [--out DIR]
    python benchmarks/bench_kernels.py --replot DIR   # the plots from DIR's bench_kernels*.json

--masks times each masked kind of block (documents, Gemma 2's soft cap of the scores, sliding
window, chunks, key padding, ALiBi's key bias; causal, 1 x 32/8 heads x 8192 x 128): ours as the
ring op runs it at W = 1, its forward op and then its backward op as a compiled graph calls them
("auto": documents on FA2's varlen kernel, chunks on cuDNN, the rest on Triton) and on Triton alone,
FA2's varlen kernel called directly on the same problems (its segments made outside the timing),
cuDNN SDPA given the same mask as a dense additive bias (for the soft cap, which no SDPA backend
computes, compiled flex_attention with it as score_mod), and cuDNN's plain causal kernel, with
TFLOP/s counted over the pairs each mask lets through (``density``), so the rows compare at the
same density. The table's "work's ideal" is cuDNN's plain causal time x density / 0.5. The inputs
are laid out (B, S, H, D), as a model's projections give them.

--blocks times cuDNN on each kind of ring block (1 x 32/8 heads, 8192 tokens a rank, d 128): the
forward, and the backward with K/V grouped as they travel (what the engine does) or expanded to
the query heads (dK/dV summed back).

--sweep-masks times tile configurations of ours-triton on each masked kind (forward and backward
separately, into sweep_masks.json).

--sweep times tile configurations of ours-triton instead (forward and backward separately). The plot
needs matplotlib; where it is missing (the GPU image) the JSON is written and --replot draws it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import replace

import torch
import triton
from saving import replot, save_run  # (benchmarks/saving.py: a script's folder is on its path)

from ringcompile.blocks import Piece
from ringcompile.kernels import select_kernels, varlen
from ringcompile.kernels.triton import BwdConfig, FwdConfig, TritonKernels
from ringcompile.masks import AttentionMask, BlockMask, PositionRules

SHAPES = [  # (B, H, Hkv, S, D)
    (1, 32, 8, 8192, 128),
    (1, 32, 8, 32768, 128),
    (4, 16, 16, 8192, 64),
]
PLOT_SEQ = [2048, 4096, 8192, 16384, 32768]  # (1, 32, 8, S, 128) causal, for the plot
IMPLS = ["ours", "ours-triton", "cudnn", "flash", "efficient", "seed"]


def flops(B, H, S, D, causal, mode):
    f = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def bench(fn, rep_ms):
    # warm-up of half the timed span: at 32k one fwd+bwd takes ~80 ms, and a 100 ms warm-up (one
    # or two calls) left the clocks and caches cold enough to read 1-2 % low
    return triton.testing.do_bench(
        fn, warmup=max(25, rep_ms // 2), rep=rep_ms, return_mode="median"
    )


def make_inputs(B, H, Hkv, S, D, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=dtype)

    return r(B, H, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(B, H, S, D)


def ours_fns(q, k, v, dout, causal, kernels=None, mask=None):
    """``kernels``: an AttentionKernels object (default: TritonKernels()) or a choice name."""
    if kernels is None or isinstance(kernels, str):
        kernels = select_kernels(q, kernels or "triton")
    S, D = q.shape[2], q.shape[3]
    pos = torch.arange(S, device="cuda")
    if mask is None:
        # the block says what it is, as the ring's masks do
        mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(causal),
                         pieces=(Piece(0, S, 0, S, causal),))  # fmt: skip
    scale = D**-0.5

    def fwd():
        state = kernels.forward_init(q)
        kernels.forward_step(state, q, k, v, mask, scale, last=True)
        return kernels.forward_finish(state, q.dtype)

    def bwd(out, lse):
        prepared = kernels.backward_prepare(out, dout)
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        dk = torch.empty(k.shape, device="cuda", dtype=torch.float32)
        dv = torch.empty(v.shape, device="cuda", dtype=torch.float32)
        kernels.backward_step(q, k, v, dout, lse, prepared, mask, scale, dq, dk, dv, dkv_fresh=True)

    def fwd_bwd():
        out, lse = fwd()
        bwd(out, lse)

    return fwd, fwd_bwd, bwd


def ring_op_fns(q, k, v, dout, mask: AttentionMask, kernels: str):
    """The ring op at W = 1 as a compiled graph calls it: its forward op, then its backward op
    (the gradients as the op returns them; no autograd around it)."""
    B, H, S, D = q.shape
    options = (*mask.encode(), D**-0.5, "contiguous", S, "", kernels)

    def fwd():
        return torch.ops.ringcompile.ring_attention(q, k, v, *options)

    def fwd_bwd():
        out, lse = fwd()
        torch.ops.ringcompile.ring_attention_backward(dout, q, k, v, out, lse, *options)

    return fwd, fwd_bwd


def sdpa_fns(q, k, v, dout, causal, backend, attn_mask=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[1] // k.shape[1]
    qg = q.detach().requires_grad_()
    kg = k.repeat_interleave(G, 1).detach().requires_grad_()
    vg = v.repeat_interleave(G, 1).detach().requires_grad_()
    sdp = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]  # fmt: skip

    def fwd():
        with sdpa_kernel(sdp), torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                qg, kg, vg, attn_mask, is_causal=causal
            )

    def fwd_bwd():
        with sdpa_kernel(sdp):
            out = torch.nn.functional.scaled_dot_product_attention(
                qg, kg, vg, attn_mask, is_causal=causal
            )
        torch.autograd.grad(out, (qg, kg, vg), dout)

    return fwd, fwd_bwd


def flex_soft_cap_fns(q, k, v, dout, softcap):
    """Compiled flex_attention, causal, with Gemma 2's soft cap as its score_mod: PyTorch's own
    route to a soft cap (SDPA has none)."""
    from torch.nn.attention import flex_attention as flex

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def cap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    S = q.shape[2]
    block_mask = flex.create_block_mask(causal, None, None, S, S, device=q.device)
    attend = torch.compile(flex.flex_attention)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return attend(qg, kg, vg, score_mod=cap, block_mask=block_mask, enable_gqa=True)

    def fwd_bwd():
        out = attend(qg, kg, vg, score_mod=cap, block_mask=block_mask, enable_gqa=True)
        torch.autograd.grad(out, (qg, kg, vg), dout)

    return fwd, fwd_bwd


def flash_varlen_fns(q, k, v, dout, seg):
    """FA2's varlen kernel on a block's ``Segments``, its inputs packed outside the timing."""
    fa2 = varlen.FlashVarlenBlocks()
    B, H, S, D = q.shape
    rows = [t.transpose(1, 2).reshape(B * S, t.shape[1], D).contiguous() for t in (q, k, v, dout)]
    q3, k3, v3, do3 = rows[0], seg.pack_keys(rows[1]), seg.pack_keys(rows[2]), rows[3]
    scale = D**-0.5

    def fwd():
        return fa2.varlen_forward(q3, k3, v3, seg, scale)

    def fwd_bwd():
        out, lse = fwd()
        fa2.varlen_backward(do3, q3, k3, v3, out, lse, seg, scale)

    return fwd, fwd_bwd


def seed_fns(q, k, v, dout, causal):
    # The seed's layout is (batch, seq, heads, dim); its GQA groups heads differently from SDPA,
    # which changes no timing.
    from ring_attention_pytorch import ring_flash_attn_cuda

    qs, ks, vs, dos = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
    qs.requires_grad_()
    ks.requires_grad_()
    vs.requires_grad_()
    bucket = 1024

    def fwd():
        with torch.no_grad():
            return ring_flash_attn_cuda(qs, ks, vs, None, causal, bucket)

    def fwd_bwd():
        out = ring_flash_attn_cuda(qs, ks, vs, None, causal, bucket)
        torch.autograd.grad(out, (qs, ks, vs), dos)

    return fwd, fwd_bwd


def impl_fns(name, q, k, v, dout, causal):
    if name == "ours":
        return ours_fns(q, k, v, dout, causal, "auto")[:2]
    if name == "ours-triton":
        return ours_fns(q, k, v, dout, causal, "triton")[:2]
    if name == "seed":
        return seed_fns(q, k, v, dout, causal)
    return sdpa_fns(q, k, v, dout, causal, name)


def measure(name, shape, causal, modes=("fwd", "fwd+bwd")):
    B, H, Hkv, S, D = shape
    q, k, v, dout = make_inputs(B, H, Hkv, S, D)
    res = {}
    try:
        fns = dict(zip(("fwd", "fwd+bwd"), impl_fns(name, q, k, v, dout, causal)))
        for mode in modes:
            rep = 1200 if S >= 32768 else 300
            ms = bench(fns[mode], rep)
            res[mode] = (ms, flops(B, H, S, D, causal, mode) / ms * 1e-9)
    except Exception as e:  # an implementation that cannot run a shape is reported, not fatal
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    del q, k, v, dout
    torch.cuda.empty_cache()
    return res


def mask_kinds(S, device, H=32, D=128):
    """(name, BlockMask, dense additive bias for SDPA, allowed pairs) of each masked kind, causal."""
    pos = torch.arange(S, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    docs = torch.cumsum(torch.rand(1, S, generator=g, device=device) < 1 / 1024, 1)  # ~1k tokens
    valid = torch.ones(1, S, dtype=torch.bool, device=device)
    valid[:, : S // 8] = False  # left padding, an eighth of the keys
    kinds = [
        ("documents (~1k tokens each)", dict(q_doc=docs, k_doc=docs)),
        ("soft cap 50 (Gemma 2)", dict(softcap=50.0)),
        ("window 1024", dict(rules=PositionRules(True, window_left=1023))),
        ("chunks of 1024 (Llama 4)", dict(rules=PositionRules(True, chunk=1024))),
        ("padding 1/8 of keys", dict(k_valid=valid)),
        # Falcon's ALiBi: slope_h * position_k / sqrt(d), per head and key (slopes 2^(-8h/H))
        (
            "ALiBi key bias",
            dict(
                dense=(2.0 ** (-8 * torch.arange(1, H + 1, device=device) / H))[None, :, None, None]
                * pos
                / D**0.5
            ),
        ),
    ]
    for name, kw in kinds:
        if "dense" in kw:
            kw["dense"] = kw["dense"].to(torch.bfloat16)
        # the same mask as the ring op takes it
        facts = {"document_ids": kw.get("q_doc"), "key_padding_mask": kw.get("k_valid"),
                 "key_bias": kw.get("dense"), "softcap": kw.get("softcap", 0.0)}  # fmt: skip
        call_mask = AttentionMask(kw.get("rules", PositionRules(True)), **facts)
        # one rank's block as the ring makes it: positions in one progression, named (segments
        # and tile lists kept), the documents' tensor given
        mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, progression=(0, 0, 1),
                         positions_key=("bench_kernels", S),
                         documents_source=kw.get("q_doc"),
                         **{"rules": PositionRules(True), **kw})  # fmt: skip
        allowed = mask.allowed()[:, None]  # (1, 1, S, S)
        bias = torch.zeros(allowed.shape, device=device, dtype=torch.bfloat16)
        if mask.dense is not None:
            bias = bias + mask.dense  # (1, H, S, S)
        # rows that see nothing (padding) get one key so SDPA stays finite; they are few
        unseen = ~allowed.any(-1, keepdim=True)
        yield (name, mask, call_mask, bias.masked_fill(~(allowed | unseen), float("-inf")),
               allowed)  # fmt: skip


def masks_table(out_dir):
    B, H, Hkv, S, D = 1, 32, 8, 8192, 128
    # laid out (B, S, H, D), as a model's projections give them (viewed as (B, H, S, D))
    q, k, v, dout = (t.transpose(1, 2).contiguous().transpose(1, 2)
                     for t in make_inputs(B, H, Hkv, S, D))  # fmt: skip
    rows = []
    for name, mask, call_mask, bias, allowed in mask_kinds(S, "cuda"):
        density = allowed.float().mean().item()
        full = 4 * B * H * S * S * D * density
        fns = {
            "ours": ring_op_fns(q, k, v, dout, call_mask, "auto"),
            "ours (triton)": ring_op_fns(q, k, v, dout, call_mask, "triton"),
        }
        seg = varlen.segments(mask, B)
        if seg is not None:
            fns["FA2 varlen (direct)"] = flash_varlen_fns(q, k, v, dout, seg)
        if mask.softcap:
            fns["flex, same soft cap"] = flex_soft_cap_fns(q, k, v, dout, mask.softcap)
        else:
            fns["cudnn, same mask as bias"] = sdpa_fns(q, k, v, dout, False, "cudnn", bias)
        fns["cudnn, plain causal"] = sdpa_fns(q, k, v, dout, True, "cudnn")
        for impl, (fwd, fwd_bwd) in fns.items():
            row = dict(mask=name, density=density, impl=impl)
            try:
                for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    ms = bench(fn, 300)
                    # the plain causal kernel does causal work (density 1/2) whatever the mask
                    work = 4 * B * H * S * S * D * 0.5 if "plain" in impl else full
                    row[mode] = (ms, work * (3.5 if mode == "fwd+bwd" else 1) / ms * 1e-9)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
    save_run(
        out_dir,
        "bench_kernels_masks",
        rows,
        lambda: plot_masks(rows, os.path.join(out_dir, "bench_kernels_masks.png")),
    )
    print("\n| mask (causal, 1x32/8x8192x128) | density | kernel | fwd+bwd ms | TFLOP/s "
          "(fwd+bwd, fwd) | work's ideal / this |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    plain = {r["mask"]: r["fwd+bwd"][0] for r in rows
             if r["impl"] == "cudnn, plain causal" and "fwd+bwd" in r}  # fmt: skip
    for r in rows:
        if "fwd" not in r:
            print(f"| {r['mask']} | {r['density']:.3f} | {r['impl']} | {r['error']} | | |")
            continue
        ideal = plain[r["mask"]] * r["density"] / 0.5 if r["mask"] in plain else float("nan")
        print(f"| {r['mask']} | {r['density']:.3f} | {r['impl']} | {r['fwd+bwd'][0]:.2f} | "
              f"{r['fwd+bwd'][1]:.0f}, {r['fwd'][1]:.0f} | {ideal / r['fwd+bwd'][0]:.2f} |")  # fmt: skip


def plot_masks(rows, path):
    """fwd+bwd ms of each mask kind, one bar per kernel (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(r["mask"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ms = {(r["mask"], r["impl"]): r["fwd+bwd"][0] for r in rows if "fwd+bwd" in r}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs = [m + (i - (len(impls) - 1) / 2) * width for m in range(len(masks))]
        heights = [ms.get((m, impl)) for m in masks]  # None: not run for that mask
        bars = ax.bar(xs, [h or 0.0 for h in heights], width, label=impl)
        ax.bar_label(bars, labels=[f"{h:.2f}" if h else "" for h in heights], fontsize=7)
    ax.set_xticks(range(len(masks)), [m.replace(" (", "\n(") for m in masks], fontsize=8)
    ax.set_ylabel("fwd+bwd ms (lower is better)")
    ax.set_title("Masked kinds, causal, 1 x 32/8 heads x 8192 x 128, bf16", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def blocks_table(out_dir):
    from ringcompile.kernels.sdpa_blocks import CudnnBlocks

    B, H, Hkv, S, D = 1, 32, 8, 8192, 128
    q, k, v, dout = make_inputs(B, H, Hkv, S, D)
    h = S // 2
    kinds = [  # (name, rows, keys, causal)
        ("full", slice(0, S), slice(0, S), False),
        ("causal diagonal", slice(0, S), slice(0, S), True),
        ("strictly causal (striped)", slice(1, S), slice(0, S - 1), True),
        ("zigzag: all rows x first half of keys", slice(0, S), slice(0, h), False),
        ("zigzag: second half of rows x all keys", slice(h, S), slice(0, S), False),
        ("own block's later keys: causal square", slice(h, S), slice(h, S), True),
        ("own block's earlier keys: full part", slice(h, S), slice(0, h), False),
    ]
    rows = []
    default = CudnnBlocks()
    for name, r, c, causal in kinds:
        qs, ks, vs, ds = q[:, :, r], k[:, :, c], v[:, :, c], dout[:, :, r]
        out, lse = default.forward(qs, ks, vs, causal, D**-0.5)
        out = out.contiguous()
        n_q, n_k = qs.shape[2], ks.shape[2]
        work = 4 * B * H * n_q * n_k * D * (0.5 if causal else 1.0)
        row = dict(block=name, q=n_q, k=n_k, causal=causal)
        row["fwd"] = bench(lambda: default.forward(qs, ks, vs, causal, D**-0.5), 200)
        G = H // Hkv

        def expanded():
            dq, dk, dv = default.backward(
                ds,
                qs,
                ks.repeat_interleave(G, 1),
                vs.repeat_interleave(G, 1),
                out,
                lse,
                causal,
                D**-0.5,
            )
            return dq, dk.unflatten(1, (Hkv, G)).sum(2), dv.unflatten(1, (Hkv, G)).sum(2)

        row["bwd grouped"] = bench(lambda: default.backward(ds, qs, ks, vs, out, lse, causal,
                                                            D**-0.5), 300)  # fmt: skip
        row["bwd expanded"] = bench(expanded, 300)
        row["tflops"] = {m: (work * (2.5 if "bwd" in m else 1)) / row[m] * 1e-9
                         for m in ("fwd", "bwd grouped", "bwd expanded")}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    with open(os.path.join(out_dir, "bench_kernels_blocks.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(
        "\n| cuDNN block (1x32/8 heads, d 128) | q x k | fwd ms (TFLOP/s) | bwd grouped ms | "
        "bwd expanded ms |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        t = r["tflops"]
        print(
            f"| {r['block']} | {r['q']} x {r['k']}{' causal' if r['causal'] else ''} | "
            f"{r['fwd']:.3f} ({t['fwd']:.0f}) | {r['bwd grouped']:.3f} ({t['bwd grouped']:.0f}) | "
            f"{r['bwd expanded']:.3f} ({t['bwd expanded']:.0f}) |"
        )


def sweep(out_dir):
    """Tile configurations of ours, forward and backward timed on their own."""
    F, Bw = FwdConfig, BwdConfig

    # candidates around the winners of the previous sweeps (benchmarks/RESULTS.md), and launch
    # orders: chunks of 1 head (one head's tiles after another's) up to all heads
    def orders(cfg, chunks):
        return [replace(cfg, heads_per_chunk=c) for c in chunks]

    def bwd_orders(cfg, chunks):  # (dk/dv chunk, dq kernel chunk)
        return [replace(cfg, heads_per_chunk=a, dq=cfg.dq and replace(cfg.dq, heads_per_chunk=b))
                for a, b in chunks]  # fmt: skip

    # the ways of adding dq (see ringcompile.kernels.triton.backward)
    bwd128 = [Bw(128, 64, 8, 2, dq=F(128, 128, 8, 3)), Bw(128, 64, 8, 2, dq_bulk=True),
              Bw(128, 64, 8, 2), Bw(128, 64, 8, 3, dq_bulk=True)]  # fmt: skip
    plan = [
        ((1, 32, 8, 32768, 128), orders(F(256, 64, 8, 3), [None, 1, 4, 8, 32]),
         bwd128 + bwd_orders(bwd128[1], [(1, None), (8, None)])),
        ((1, 32, 8, 16384, 128), orders(F(256, 64, 8, 3), [None, 1, 32]) + [F(128, 128, 8, 3)],
         bwd128),
        ((1, 32, 8, 8192, 128), orders(F(128, 128, 8, 3), [None, 1, 4, 32]),
         bwd128 + bwd_orders(bwd128[1], [(1, None), (8, None)])),
    ]  # fmt: skip
    rows = []
    for shape, fwd_cfgs, bwd_cfgs in plan:
        B, H, Hkv, S, D = shape
        q, k, v, dout = make_inputs(B, H, Hkv, S, D)
        ff = flops(B, H, S, D, True, "fwd")
        for cfg in fwd_cfgs:
            try:
                fwd, _, _ = ours_fns(q, k, v, dout, True, TritonKernels(fwd_config=cfg))
                ms = bench(fwd, 200)
                rows.append(
                    dict(shape=shape, kind="fwd", cfg=str(cfg), ms=ms, tflops=ff / ms * 1e-9)
                )
            except Exception as e:
                rows.append(dict(shape=shape, kind="fwd", cfg=str(cfg), error=str(e)[:200]))
            print(rows[-1], flush=True)
        out, lse = ours_fns(q, k, v, dout, True)[0]()
        for cfg in bwd_cfgs:
            try:
                _, _, bwd = ours_fns(q, k, v, dout, True, TritonKernels(bwd_config=cfg))
                ms = bench(functools.partial(bwd, out, lse), 300)
                rows.append(dict(shape=shape, kind="bwd", cfg=str(cfg), ms=ms,
                                 tflops=2.5 * ff / ms * 1e-9))  # fmt: skip
            except Exception as e:
                rows.append(dict(shape=shape, kind="bwd", cfg=str(cfg), error=str(e)[:200]))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


def sweep_masks(out_dir):
    """Tile configurations of ours-triton on each masked kind (``mask_kinds``; 1 x 32/8 heads x
    8192 x 128, inputs laid out (B, S, H, D)), forward and backward timed on their own; ``None``
    is the default the host picks."""
    F, Bw = FwdConfig, BwdConfig
    fwd_cfgs = [None, F(128, 128, 8, 3), F(128, 64, 4, 2), F(128, 64, 8, 3), F(64, 64, 4, 3),
                F(64, 128, 4, 3), F(128, 32, 4, 3)]  # fmt: skip
    bwd_cfgs = [None, Bw(128, 64, 8, 2, dq_bulk=True), Bw(64, 64, 4, 2, dq_bulk=True),
                Bw(128, 32, 8, 2, dq_bulk=True), Bw(64, 32, 4, 2, dq_bulk=True),
                Bw(128, 64, 8, 3, dq_bulk=True), Bw(128, 64, 8, 2, dq=F(128, 128, 8, 3)),
                Bw(64, 64, 4, 2, dq=F(128, 64, 4, 2))]  # fmt: skip
    B, H, Hkv, S, D = 1, 32, 8, 8192, 128
    q, k, v, dout = (t.transpose(1, 2).contiguous().transpose(1, 2)
                     for t in make_inputs(B, H, Hkv, S, D))  # fmt: skip
    rows = []
    for name, mask, _, _, allowed in mask_kinds(S, "cuda"):
        work = 4 * B * H * S * S * D * allowed.float().mean().item()
        out, lse = ours_fns(q, k, v, dout, True, mask=mask)[0]()
        for kind, cfgs in (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)):
            for cfg in cfgs:
                row = dict(mask=name, kind=kind, cfg=str(cfg))
                try:
                    kernels = TritonKernels(**{f"{kind}_config": cfg})
                    fwd, _, bwd = ours_fns(q, k, v, dout, True, kernels, mask)
                    fn = fwd if kind == "fwd" else functools.partial(bwd, out, lse)
                    row["ms"] = bench(fn, 200)
                    row["tflops"] = work * (1 if kind == "fwd" else 2.5) / row["ms"] * 1e-9
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(row, flush=True)
    with open(os.path.join(out_dir, "sweep_masks.json"), "w") as f:
        json.dump(rows, f, indent=1)


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name in IMPLS:
            xs = [S for S in PLOT_SEQ if mode in points.get((name, S), {})]
            ys = [points[(name, S)][mode][1] for S in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, causal, B=1 H=32 Hkv=8 D=128 bf16")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--masks", action="store_true", help="the masked kinds beside cuDNN")
    ap.add_argument(
        "--sweep-masks", action="store_true", help="tile configurations per masked kind"
    )
    ap.add_argument("--blocks", action="store_true", help="cuDNN on each kind of ring block")
    ap.add_argument("--only", default=",".join(IMPLS))
    ap.add_argument("--replot", metavar="DIR")
    args = ap.parse_args()
    if args.replot and os.path.exists(os.path.join(args.replot, "bench_kernels_masks.json")):
        replot(args.replot, "bench_kernels_masks", plot_masks)
    if args.replot and os.path.exists(os.path.join(args.replot, "bench_kernels.json")):
        with open(os.path.join(args.replot, "bench_kernels.json")) as f:
            saved = json.load(f)["plot"]
        points = {(key.split("/")[0], int(key.split("/")[1])): {m: tuple(v) for m, v in p.items()}
                  for key, p in saved.items()}  # fmt: skip
        plot(points, os.path.join(args.replot, "bench_kernels.png"))
    if args.replot:
        return
    print(f"torch {torch.__version__} triton {triton.__version__} cudnn "
          f"{torch.backends.cudnn.version()} device {torch.cuda.get_device_name()}", flush=True)  # fmt: skip
    if args.sweep:
        sweep(args.out)
        return
    if args.sweep_masks:
        sweep_masks(args.out)
        return
    if args.masks:
        masks_table(args.out)
        return
    if args.blocks:
        blocks_table(args.out)
        return
    impls = args.only.split(",")
    table = []
    for shape in SHAPES:
        for causal in (True, False):
            for name in impls:
                res = measure(name, shape, causal)
                table.append(dict(impl=name, shape=shape, causal=causal, **res))
                print(table[-1], flush=True)
    points = {}
    for S in PLOT_SEQ:
        for name in impls:
            if S in (8192, 32768):
                hit = [r for r in table if r["impl"] == name and r["shape"] == (1, 32, 8, S, 128)
                       and r["causal"]]  # fmt: skip
                points[(name, S)] = {m: hit[0][m] for m in ("fwd", "fwd+bwd") if m in hit[0]}
            else:
                points[(name, S)] = measure(name, (1, 32, 8, S, 128), True)
    save_run(
        args.out,
        "bench_kernels",
        dict(table=table, plot={f"{n}/{S}": p for (n, S), p in points.items()}),
        lambda: plot(points, os.path.join(args.out, "bench_kernels.png")),
    )

    print("\nTFLOP/s: fwd+bwd fwd")
    print("| B,H,Hkv,S,D | causal | " + " | ".join(impls) + " |")
    print("|---|---|" + "---|" * len(impls))
    for shape in SHAPES:
        for causal in (True, False):
            cells = []
            for name in impls:
                r = [t for t in table if t["impl"] == name and t["shape"] == shape
                     and t["causal"] == causal][0]  # fmt: skip
                cells.append(
                    " ".join(f"{r[m][1]:.0f}" if m in r else "n/a" for m in ("fwd+bwd", "fwd"))
                )
            print(f"| {','.join(map(str, shape))} | {'yes' if causal else 'no'} | "
                  + " | ".join(cells) + " |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
