"""The GPU kernels (Triton, and the block engine's cuDNN blocks and merge) at realistic shapes,
against an fp64 reference and against SDPA.

Criterion: for out, dq, dk and dv, ours' relative error to the fp64 ReferenceKernels result is at
most 1.5x that of an SDPA backend in the same dtype on the same inputs. The comparator is SDPA's
flash backend (FlashAttention-2) where it can express the mask (none, or causal with queries and
keys at the same positions); for other masks it is the memory-efficient backend with the mask as
an attention mask (flash takes no mask). GQA inputs are given to SDPA with K/V expanded by
repeat_interleave. Rows that see no key are compared exactly (ours must give 0 and zero grads)
and left out of the norms.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ringcompile.kernels.reference import ReferenceKernels
from ringcompile.layout import make_layout
from ringcompile.masks import BlockMask, PositionRules

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tf():
    """The Triton kernels' package with every buffer the kernels must fill poisoned with NaN."""
    import ringcompile.kernels.triton as tf
    from ringcompile.kernels.triton import host

    def poisoned(shape, dtype, device, strides=None):
        if strides is None:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty_strided(shape, strides, dtype=dtype, device=device).fill_(float("nan"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host, "_empty", poisoned)
        yield tf


@pytest.fixture(scope="module")
def configs():
    """The Triton kernels' launch configurations."""
    from ringcompile.kernels.triton import configs

    return configs


def _rel(err_of: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor | None) -> float:
    if keep is not None:
        err_of, ref = err_of[keep], ref[keep]
    return ((err_of.double() - ref).norm() / ref.norm()).item()


def _ours(tf, q, k_blocks, v_blocks, masks, dout, scale, kernels=None):
    kernels = kernels or tf.TritonKernels()
    state = kernels.forward_init(q)
    for i, (k, v, m) in enumerate(zip(k_blocks, v_blocks, masks)):
        kernels.forward_step(state, q, k, v, m, scale, last=i == len(masks) - 1)
    out, lse = kernels.forward_finish(state, q.dtype)
    delta = kernels.backward_prepare(out, dout)
    # accumulators start from random values: the kernels must add, not overwrite
    dq0 = torch.randn(q.shape, device=q.device)
    dk0 = [torch.randn(k.shape, device=q.device) for k in k_blocks]
    dv0 = [torch.randn(v.shape, device=q.device) for v in v_blocks]
    dq, dk, dv = dq0.clone(), [t.clone() for t in dk0], [t.clone() for t in dv0]
    for k, v, m, dk_i, dv_i in zip(k_blocks, v_blocks, masks, dk, dv):
        kernels.backward_step(q, k, v, dout, lse, delta, m, scale, dq, dk_i, dv_i)
    dk = torch.cat([a - b for a, b in zip(dk, dk0)], 2)
    dv = torch.cat([a - b for a, b in zip(dv, dv0)], 2)
    return out, lse, dq - dq0, dk, dv


def _reference64(q, k, v, mask, dout, scale):
    ref = ReferenceKernels()
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    state = ref.forward_init(q)
    ref.forward_step(state, q, k, v, mask, scale, last=True)
    out, lse = ref.forward_finish(state, torch.float64)
    delta = ref.backward_prepare(out, dout)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    ref.backward_step(q, k, v, dout, lse, delta, mask, scale, dq, dk, dv)
    return out, lse, dq, dk, dv


def _sdpa(q, k, v, dout, scale, backend, causal=False, attn_mask=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[1] // k.shape[1]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(getattr(SDPBackend, backend)):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
            attn_mask=attn_mask, is_causal=causal, scale=scale,
        )  # fmt: skip
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _compare(tf, q, k, v, mask, dout, scale, sdpa_backend, sdpa_causal, attn_mask,
             ring_steps=None, kernels=None):  # fmt: skip
    """ring_steps: list of (key index tensor, BlockMask) to run ours as a ring over K/V blocks."""
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference64(q, k, v, mask, dout, scale)
    if ring_steps is None:
        ours = _ours(tf, q, [k], [v], [mask], dout, scale, kernels)
        ours_dk, ours_dv = ours[3], ours[4]
    else:
        idx = [i for i, _ in ring_steps]
        ours = _ours(tf, q, [k[:, :, i] for i in idx], [v[:, :, i] for i in idx],
                     [m for _, m in ring_steps], dout, scale, kernels)  # fmt: skip
        order = torch.cat(idx)
        ours_dk = torch.empty_like(ours[3])
        ours_dv = torch.empty_like(ours[4])
        ours_dk[:, :, order] = ours[3]
        ours_dv[:, :, order] = ours[4]
    out, lse, dq, dk, dv = ours[0], ours[1], ours[2], ours_dk, ours_dv
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv)):
        assert not t.isnan().any(), f"{name} has NaN: unwritten or invalid"

    seen = ref_lse > float("-inf")  # (B, H, Sq)
    assert torch.equal(lse == float("-inf"), ~seen), "rows without keys differ"
    if not seen.all():
        assert (out[~seen] == 0).all() and (dq[~seen] == 0).all()
    sd_out, sd_dq, sd_dk, sd_dv = _sdpa(q, k, v, dout, scale, sdpa_backend, sdpa_causal, attn_mask)
    report = {}
    for name, o, s, r, keep in (
        ("out", out, sd_out, ref_out, seen),
        ("dq", dq, sd_dq, ref_dq, seen),
        ("dk", dk, sd_dk, ref_dk, None),
        ("dv", dv, sd_dv, ref_dv, None),
    ):
        ours_err, sdpa_err = _rel(o, r, keep), _rel(s, r, keep)
        report[name] = (ours_err, sdpa_err)
        assert ours_err <= 1.5 * sdpa_err + 1e-6, (
            f"{name}: ours {ours_err:.3e} vs SDPA {sdpa_backend} {sdpa_err:.3e}"
        )
    lse_err = (lse[seen].double() - ref_lse[seen]).abs().max().item()
    assert lse_err < 1e-3 * max(1.0, ref_lse[seen].abs().max().item()), f"lse error {lse_err}"
    print(" ".join(f"{n}: {a:.2e}/{b:.2e}" for n, (a, b) in report.items()))


def _inputs(B, H, Hkv, S, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

    return r(B, H, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(B, H, S, D)


@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_vs_flash(tf, D, causal):
    B, H, Hkv, S = 2, 8, 2, 1024
    q, k, v, dout = _inputs(B, H, Hkv, S, D)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(causal))
    _compare(tf, q, k, v, mask, dout, D**-0.5, "FLASH_ATTENTION", causal, None)


@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1)])
def test_gqa_vs_flash(tf, H, Hkv):
    B, S, D = 2, 1536, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=1)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True))
    _compare(tf, q, k, v, mask, dout, D**-0.5, "FLASH_ATTENTION", True, None)


def test_long_blocks_vs_flash(tf, configs):
    """16k queries and keys: the forward takes its tall query tiles (see default_fwd_config)."""
    B, H, Hkv, S, D = 1, 2, 1, configs._LONG_BLOCK, 128
    assert configs.default_fwd_config(D, torch.bfloat16, S, S).block_m == 256
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=6)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True))
    _compare(tf, q, k, v, mask, dout, D**-0.5, "FLASH_ATTENTION", True, None)


def _dq_way_config(tf, way: str):
    bwd = {
        "bulk": tf.BwdConfig(128, 64, 8, 2, dq_bulk=True),
        "atomic": tf.BwdConfig(128, 64, 8, 2),
        "kernel": tf.BwdConfig(128, 64, 8, 2, dq=tf.FwdConfig(128, 128, 8, 3)),
    }[way]
    return tf.TritonKernels(bwd_config=bwd)


@pytest.mark.parametrize("way", ["bulk", "atomic", "kernel"])
def test_dq_ways_vs_flash(tf, configs, way):
    """Each way of adding dq, at a ragged length, with GQA and a padded head dim."""
    B, H, Hkv, S, D = 2, 8, 2, 1000, 80
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=7)
    if way == "bulk" and not configs._bulk_reduce_ok(torch.zeros(q.shape, device="cuda")):
        pytest.skip("no bulk reductions on this GPU or Triton")
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True))
    _compare(tf, q, k, v, mask, dout, D**-0.5, "FLASH_ATTENTION", True, None,
             kernels=_dq_way_config(tf, way))  # fmt: skip


def test_dq_bulk_falls_back_on_unaligned_accumulator(tf, configs):
    """A dq whose rows are not 16-byte aligned cannot take bulk reductions: atomics add it."""
    B, H, Hkv, S, D = 1, 4, 2, 512, 64
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=8)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True))
    kernels = _dq_way_config(tf, "bulk")
    state = kernels.forward_init(q)
    kernels.forward_step(state, q, k, v, mask, D**-0.5, last=True)
    out, lse = kernels.forward_finish(state, q.dtype)
    delta = kernels.backward_prepare(out, dout)
    dqs = [torch.zeros(q.shape, device="cuda"), torch.zeros(B, H, S, D + 1, device="cuda")[..., 1:]]
    assert not configs._bulk_reduce_ok(dqs[1])
    for dq in dqs:
        dk, dv = torch.zeros(k.shape, device="cuda"), torch.zeros(v.shape, device="cuda")
        kernels.backward_step(q, k, v, dout, lse, delta, mask, D**-0.5, dq, dk, dv)
    torch.testing.assert_close(dqs[1], dqs[0], rtol=1e-5, atol=1e-5)


def _mask_case(kind: str, B: int, H: int, S: int, gen: torch.Generator):
    """A BlockMask of one kind over a whole sequence, and the same mask for SDPA."""
    dev = "cuda"
    pos = torch.arange(S, device=dev)
    kw: dict = dict(q_pos=pos, k_pos=pos, seq_len=S)
    kw["rules"] = PositionRules.of(
        "causal" in kind,
        (200, 64) if "window" in kind else None,
        300 if "chunk" in kind else None,
        333 if "prefix" in kind else None,
    )
    if "docs" in kind:
        starts = torch.rand(B, S, generator=gen, device=dev) < 1 / 300
        docs = torch.cumsum(starts.long(), 1)
        kw["q_doc"] = kw["k_doc"] = docs
    if "valid" in kind:
        valid = torch.rand(B, S, generator=gen, device=dev) < 0.9
        valid[:, S - 100 :] = False  # trailing padding
        kw["k_valid"] = valid
    if "dense_bool" in kind:
        kw["dense"] = torch.rand(B, 1, S, S, generator=gen, device=dev) < 0.6
    if "dense_add" in kind:
        dense = torch.randn(1, H, S, S, generator=gen, device=dev).to(torch.bfloat16)
        dense[torch.rand(1, H, S, S, generator=gen, device=dev) < 0.3] = float("-inf")
        kw["dense"] = dense
    if "key_bias" in kind:  # ALiBi's: slope_h * position_k, the same for every query
        slopes = 2.0 ** (-torch.arange(1, H + 1, device=dev, dtype=torch.float32))
        kw["dense"] = (slopes[None, :, None, None] * pos).to(torch.bfloat16)
    mask = BlockMask(**kw)
    allowed = mask.allowed()[:, None]  # (B|1, 1, S, S)
    if mask.dense is not None and mask.dense.dtype == torch.bool:
        allowed = allowed & mask.dense
    attn = torch.zeros(allowed.shape, device=dev, dtype=torch.bfloat16).masked_fill(
        ~allowed, float("-inf")
    )
    if mask.dense is not None and mask.dense.dtype != torch.bool:
        attn = attn + mask.dense
    return mask, attn


@pytest.mark.parametrize(
    "kind",
    ["window", "causal_window", "docs", "causal_docs", "valid", "dense_bool", "dense_add",
     "causal_docs_valid", "causal_window_dense_bool", "window_dense_add", "chunk",
     "causal_chunk_valid", "causal_key_bias_valid", "causal_prefix", "causal_prefix_docs_valid"],
)  # fmt: skip
def test_masks_vs_efficient(tf, kind):
    B, H, Hkv, S, D = 2, 8, 2, 1024, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    mask, attn = _mask_case(kind, B, H, S, gen)
    # The efficient backend returns NaN on rows with no key; give it a harmless row there (those
    # rows are compared exactly, outside the norms).
    unseen = (attn == float("-inf")).all(-1, keepdim=True)
    attn = attn.masked_fill(unseen, 0.0).expand(B, H, S, S).contiguous()
    _compare(tf, q, k, v, mask, dout, D**-0.5, "EFFICIENT_ATTENTION", False, attn)


def _eager_soft_capped(q, k, v, attn, dout, scale, softcap):
    """Gemma 2's eager attention in the inputs' dtype (its softmax in float32): out, dq, dk, dv."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    kx, vx = kg.repeat_interleave(G, 1), vg.repeat_interleave(G, 1)
    s = qg @ kx.transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap) + attn
    out = s.softmax(-1, dtype=torch.float32).to(q.dtype) @ vx
    out.backward(dout)
    return out.detach(), qg.grad, kg.grad, vg.grad


@pytest.mark.parametrize("kind", ["causal", "causal_docs", "causal_window", "causal_key_bias"])
def test_soft_cap_vs_eager(tf, kind):
    """Scores soft-capped at 5 (inputs scaled so that most are bent): ours against float64,
    within 1.5x the error of the eager bf16 attention a Gemma 2 model runs otherwise."""
    B, H, Hkv, S, D = 2, 8, 2, 1024, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=6)
    q = q * 4
    mask, attn = _mask_case(kind, B, H, S, torch.Generator(device="cuda").manual_seed(7))
    mask = dataclasses.replace(mask, softcap=5.0)
    scale = D**-0.5
    ref = _reference64(q, k, v, mask, dout, scale)
    ours = _ours(tf, q, [k], [v], [mask], dout, scale)
    eager = _eager_soft_capped(q, k, v, attn, dout, scale, 5.0)
    for name, o, e, r in zip(("out", "dq", "dk", "dv"), (ours[0], *ours[2:]), eager,
                             (ref[0], *ref[2:])):  # fmt: skip
        err, eager_err = _rel(o, r, None), _rel(e, r, None)
        assert err < 1.5 * eager_err + 1e-3, f"{name}: ours {err:.2e}, eager bf16 {eager_err:.2e}"


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
def test_ring_steps_vs_flash(tf, layout):
    """Rank 2 of a ring of 4 over 4096 causal tokens: 4 steps merged, against monolithic flash."""
    W, rank, S = 4, 2, 4096
    B, H, Hkv, D = 1, 8, 2, 128
    lay = make_layout(layout, S, W)
    q_full, k, v, dout_full = _inputs(B, H, Hkv, S, D, seed=4)
    q_idx = lay.positions(rank, "cuda")
    q, dout = q_full[:, :, q_idx].contiguous(), dout_full[:, :, q_idx].contiguous()
    pos = torch.arange(S, device="cuda")
    # the reference and SDPA see the whole sequence; compare on this rank's query rows
    full_mask = BlockMask(q_pos=q_idx, k_pos=pos, seq_len=S, rules=PositionRules(True))
    steps = []
    for s in range(W):
        k_idx = lay.positions((rank - s) % W, "cuda")
        steps.append(
            (k_idx, BlockMask(q_pos=q_idx, k_pos=k_idx, seq_len=S, rules=PositionRules(True)))
        )
    allowed = full_mask.allowed()[0]  # (local queries, S)
    attn = torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16)
    attn = attn.masked_fill(~allowed, float("-inf"))
    _compare(tf, q, k, v, full_mask, dout, D**-0.5, "EFFICIENT_ATTENTION", False, attn,
             ring_steps=steps)  # fmt: skip


@pytest.mark.parametrize(
    "dtype,fp32_precision,tol",
    [
        (torch.float16, "highest", 3e-3),  # bf16's bounds scaled by the mantissa
        (torch.float32, "highest", 2e-5),  # torch's default: IEEE dots, as its own matmuls
        (torch.float32, "high", 5e-3),  # TF32 allowed: the dots take it
    ],
)  # fmt: skip
def test_other_dtypes(tf, dtype, fp32_precision, tol):
    B, H, Hkv, S, D = 1, 4, 2, 1024, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, dtype=dtype, seed=5)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True))
    ref = _reference64(q, k, v, mask, dout, D**-0.5)
    kept = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        ours = _ours(tf, q, [k], [v], [mask], dout, D**-0.5)
    finally:
        torch.set_float32_matmul_precision(kept)
    for name, o, r in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        assert ours[0].dtype == dtype
        err = _rel(o, r, None)
        assert err < tol, f"{name}: {err:.2e}"


# -- the block engine: plain blocks on cuDNN, the ring's merge ----------------------------------


def _engine():
    from ringcompile.kernels import select_kernels

    kernels = select_kernels(torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16))
    assert type(kernels).__name__ == "BlockEngine" and kernels.plain.name == "cudnn"
    return kernels


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_engine_ring_steps_vs_sdpa(tf, layout, H, Hkv, causal):
    """Every rank of a ring of 4 (4096 tokens): plain blocks on cuDNN merged by the ring's merge,
    against the fp64 reference and SDPA's efficient backend on the same rows; dk/dv with the own
    block split into the ring's two key halves and written fresh."""
    from ringcompile.blocks import layout_block_pieces

    W, S, B, D = 4, 4096, 1, 128
    lay = make_layout(layout, S, W)
    q_full, k, v, dout_full = _inputs(B, H, Hkv, S, D, seed=11)
    pos = torch.arange(S, device="cuda")
    for rank in range(W):
        q_idx = lay.positions(rank, "cuda")
        q, dout = q_full[:, :, q_idx].contiguous(), dout_full[:, :, q_idx].contiguous()
        full_mask = BlockMask(q_pos=q_idx, k_pos=pos, seq_len=S, rules=PositionRules(causal))
        steps = []
        for s in range(W):
            src = (rank - s) % W
            k_idx = lay.positions(src, "cuda")
            steps.append(
                (
                    k_idx,
                    BlockMask(
                        q_pos=q_idx,
                        k_pos=k_idx,
                        seq_len=S,
                        rules=PositionRules(causal),
                        pieces=layout_block_pieces(lay, rank, src, causal),
                    ),
                )
            )
        allowed = full_mask.allowed()[0].expand(q_idx.numel(), S)
        attn = torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16)
        attn = attn.masked_fill(~allowed, float("-inf"))
        _compare(tf, q, k, v, full_mask, dout, D**-0.5, "EFFICIENT_ATTENTION", False, attn,
                 ring_steps=steps, kernels=_engine())  # fmt: skip


@pytest.mark.parametrize("D", [64, 128, 256])
def test_engine_one_block_is_cudnn(tf, D):
    """One causal block: the engine's answer is cuDNN's own, as fast as SDPA (no merge)."""
    from ringcompile.blocks import Piece

    B, H, Hkv, S = 2, 8, 2, 1024
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=12)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True),
                     pieces=(Piece(0, S, 0, S, True),))  # fmt: skip
    _compare(tf, q, k, v, mask, dout, D**-0.5, "FLASH_ATTENTION", True, None, kernels=_engine())


def test_engine_mixes_masked_and_plain_steps(tf):
    """A ring whose steps alternate between masked (Triton) and plain (cuDNN) blocks, both
    orders, shares one state: the result is the reference's."""
    from ringcompile.blocks import layout_block_pieces

    W, S, B, H, Hkv, D = 4, 2048, 1, 8, 2, 128
    lay = make_layout("striped", S, W)
    q_full, k, v, dout_full = _inputs(B, H, Hkv, S, D, seed=13)
    rank = 1
    q_idx = lay.positions(rank, "cuda")
    q, dout = q_full[:, :, q_idx].contiguous(), dout_full[:, :, q_idx].contiguous()
    pos = torch.arange(S, device="cuda")
    full_mask = BlockMask(q_pos=q_idx, k_pos=pos, seq_len=S, rules=PositionRules(True))
    for plain_steps in ({0, 2}, {1, 3}):
        steps = []
        for s in range(W):
            src = (rank - s) % W
            k_idx = lay.positions(src, "cuda")
            pieces = layout_block_pieces(lay, rank, src, True) if s in plain_steps else None
            steps.append(
                (
                    k_idx,
                    BlockMask(
                        q_pos=q_idx,
                        k_pos=k_idx,
                        seq_len=S,
                        rules=PositionRules(True),
                        pieces=pieces,
                    ),
                )
            )
        allowed = full_mask.allowed()[0]
        attn = torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16)
        attn = attn.masked_fill(~allowed, float("-inf"))
        _compare(tf, q, k, v, full_mask, dout, D**-0.5, "EFFICIENT_ATTENTION", False, attn,
                 ring_steps=steps, kernels=_engine())  # fmt: skip


def test_engine_fresh_key_halves(tf):
    """The own block's backward in the ring's two key halves, into fresh (NaN-poisoned) dK/dV:
    every element written, the sum the whole block's."""
    from ringcompile.blocks import Piece
    from ringcompile.ring.backward import own_block_key_parts

    B, H, Hkv, S, D = 1, 8, 2, 2048, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=14)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True),
                     pieces=(Piece(0, S, 0, S, True),))  # fmt: skip
    kernels = _engine()
    state = kernels.forward_init(q)
    kernels.forward_step(state, q, k, v, mask, D**-0.5, last=True)
    out, lse = kernels.forward_finish(state, q.dtype)
    prepared = kernels.backward_prepare(out, dout)
    results = []
    for parts in ([(0, S)], own_block_key_parts(S)):
        dq = torch.zeros(q.shape, device="cuda")
        dk = torch.full(k.shape, float("nan"), device="cuda")
        dv = torch.full(v.shape, float("nan"), device="cuda")
        for lo, hi in parts:
            kernels.backward_step(q, k[:, :, lo:hi], v[:, :, lo:hi], dout, lse, prepared,
                                  mask.keys(lo, hi), D**-0.5, dq, dk[:, :, lo:hi],
                                  dv[:, :, lo:hi], dkv_fresh=True)  # fmt: skip
        assert not any(t.isnan().any() for t in (dq, dk, dv))
        results.append((dq, dk, dv))
    ref = _reference64(q, k, v, mask, dout, D**-0.5)
    for name, whole, halves, r in zip(("dq", "dk", "dv"), results[0], results[1], ref[2:]):
        assert _rel(halves, r, None) <= 1.5 * _rel(whole, r, None) + 1e-6, name


def test_merge_kernel_vs_torch():
    """The fused (out, lse) merge against the torch formula, on row slices of the state; and from
    a first block's bf16 output into the bf16 answer."""
    from ringcompile.kernels.merge import merge_block

    B, H, Sq, D = 2, 4, 300, 80
    g = torch.Generator(device="cuda").manual_seed(15)
    out = torch.randn(B, H, Sq, D, device="cuda", generator=g)
    lse = torch.randn(B, H, Sq, device="cuda", generator=g)
    lse[:, :, :7] = float("-inf")  # rows that have seen nothing yet
    blk = torch.randn(B, Sq, H, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    blk_lse = torch.randn(B, H, Sq, 1, device="cuda", generator=g)[..., 0]
    for start, n in ((0, Sq), (5, 200)):
        state, state_lse = out.clone(), lse.clone()
        merge_block(state, state, state_lse, start, blk[:, :, :n], blk_lse[:, :, :n], first=False)
        rows = slice(start, start + n)
        new = torch.logaddexp(lse[:, :, rows], blk_lse[:, :, :n])
        want = (
            out[:, :, rows] * torch.exp(lse[:, :, rows] - new)[..., None]
            + blk[:, :, :n].float() * torch.exp(blk_lse[:, :, :n] - new)[..., None]
        )
        torch.testing.assert_close(state[:, :, rows], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state_lse[:, :, rows], new, rtol=1e-6, atol=1e-6)
        untouched = torch.ones(Sq, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(state[:, :, untouched], out[:, :, untouched])
        # a first block's bf16 output (strided) read, the bf16 answer written
        first = out.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
        answer, answer_lse = torch.empty_like(first).contiguous(), lse.clone()
        merge_block(first, answer, answer_lse, start, blk[:, :, :n], blk_lse[:, :, :n], first=False)
        want = (
            first[:, :, rows].float() * torch.exp(lse[:, :, rows] - new)[..., None]
            + blk[:, :, :n].float() * torch.exp(blk_lse[:, :, :n] - new)[..., None]
        )
        torch.testing.assert_close(answer[:, :, rows].float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["striped", "contiguous"])
@pytest.mark.parametrize("kind", ["documents", "documents_window", "documents_chunks"])
def test_engine_varlen_ring_steps_vs_sdpa(tf, layout, kind, monkeypatch):
    """Ranks 0 and 3 of a ring of 4 (8192 tokens, two batch rows with their own documents of
    ~600 tokens): varlen blocks on FA2's varlen kernel (``kernels.varlen``), merged by the ring,
    against the fp64 reference and SDPA's efficient backend with the mask as a bias."""
    from ringcompile.blocks import layout_progression
    from ringcompile.kernels import varlen

    calls = []
    forward = varlen.FlashVarlenBlocks.varlen_forward
    monkeypatch.setattr(varlen.FlashVarlenBlocks, "varlen_forward",
                        lambda self, *a: calls.append(1) or forward(self, *a))  # fmt: skip
    W, S, B, H, Hkv, D = 4, 8192, 2, 8, 2, 128
    lay = make_layout(layout, S, W)
    q_full, k, v, dout_full = _inputs(B, H, Hkv, S, D, seed=14)
    g = torch.Generator(device="cuda").manual_seed(3)
    doc = torch.cumsum(torch.rand(B, S, generator=g, device="cuda") < 1 / 600, 1)
    rules = {"documents": PositionRules(True), "documents_window": PositionRules(True, 511),
             "documents_chunks": PositionRules(True, chunk=1000)}[kind]  # fmt: skip
    docs = True
    pos = torch.arange(S, device="cuda")
    for rank in (0, W - 1):
        q_idx = lay.positions(rank, "cuda")
        q, dout = q_full[:, :, q_idx].contiguous(), dout_full[:, :, q_idx].contiguous()
        q_doc = doc[:, q_idx] if docs else None
        full_mask = BlockMask(q_pos=q_idx, k_pos=pos, seq_len=S, rules=rules, q_doc=q_doc,
                              k_doc=doc if docs else None)  # fmt: skip
        steps = []
        for s in range(W):
            src = (rank - s) % W
            k_idx = lay.positions(src, "cuda")
            m = BlockMask(q_pos=q_idx, k_pos=k_idx, seq_len=S, rules=rules, q_doc=q_doc,
                          k_doc=doc[:, k_idx] if docs else None,
                          positions_key=(lay, rank, src), documents_source=doc,
                          progression=layout_progression(lay, rank, src))  # fmt: skip
            assert m.varlen
            steps.append((k_idx, m))
        allowed = full_mask.allowed()[:, None]
        attn = torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16)
        attn = attn.masked_fill(~allowed, float("-inf"))
        _compare(tf, q, k, v, full_mask, dout, D**-0.5, "EFFICIENT_ATTENTION", False, attn,
                 ring_steps=steps, kernels=_engine())  # fmt: skip
    assert calls, "no block went to FA2's varlen kernel"


def test_one_document_a_row_runs_as_plain_causal():
    """Document ids that hide nothing (each row one document) run as plain causal attention, on
    cuDNN: the forward's bits as without them (FA2's varlen kernel would round otherwise), the
    gradients as near as two backward runs."""
    from ringcompile import ring_attention

    B, H, Hkv, S, D = 2, 8, 2, 4096, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=16)
    doc = torch.arange(B, device="cuda")[:, None].expand(B, S)
    results = []
    for kw in ({}, {"document_ids": doc}):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*leaves, is_causal=True, enable_gqa=True, **kw)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-3


def test_ring_attention_on_documents_uses_flash_varlen_once_per_tensor(monkeypatch):
    """One GPU, the op itself: a model's layers share the documents' segments (one wait for the
    host per tensor of ids), and the answer is SDPA's within bf16."""
    from ringcompile import ring_attention
    from ringcompile.kernels import varlen

    made = []
    plan = varlen._plan
    monkeypatch.setattr(varlen, "_plan", lambda *a: made.append(1) or plan(*a))
    B, H, Hkv, S, D = 1, 8, 2, 4096, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=15)
    doc = torch.cumsum(torch.rand(B, S, device="cuda") < 1 / 500, 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for _ in range(3):
        out = ring_attention(q, k, v, is_causal=True, document_ids=doc, enable_gqa=True)
    out.backward(dout)
    assert len(made) == 1
    allowed = (doc[:, None, :, None] == doc[:, None, None, :]) & torch.ones(
        S, S, dtype=torch.bool, device="cuda"
    ).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.detach().double(), k.detach().double().repeat_interleave(H // Hkv, 1),
        v.detach().double().repeat_interleave(H // Hkv, 1), attn_mask=allowed,
    )  # fmt: skip
    assert (out.double() - ref).norm() / ref.norm() < 1e-2


def _check_vs_efficient_sdpa(ours, q, k, v, dout, allowed) -> None:
    """``ours`` (out, dq, dk, dv) each within 1.5x the efficient SDPA kernel's own error against
    float64 SDPA under the boolean mask ``allowed`` (K/V expanded for the kernel, its dK/dV
    summed back over each group)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, Hkv = q.shape[1], k.shape[1]
    G = H // Hkv
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=allowed,
                                                            enable_gqa=True)  # fmt: skip
    want.backward(dout.double())
    wants = [want.detach()] + [t.grad for t in ref]
    sdpa_in = [t.detach().requires_grad_() for t in (q, k.repeat_interleave(G, 1),
                                                      v.repeat_interleave(G, 1))]  # fmt: skip
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        theirs = torch.nn.functional.scaled_dot_product_attention(*sdpa_in, attn_mask=allowed)
    theirs.backward(dout)
    theirs = [theirs.detach(), sdpa_in[0].grad,
              sdpa_in[1].grad.unflatten(1, (Hkv, G)).sum(2),
              sdpa_in[2].grad.unflatten(1, (Hkv, G)).sum(2)]  # fmt: skip
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), ours, theirs, wants):
        mine, sdpa = _rel(a, w, None), _rel(b, w, None)
        assert mine <= 1.5 * sdpa + 1e-6, f"{name}: ours {mine:.2e}, efficient SDPA {sdpa:.2e}"


def test_ring_attention_mask_mod_vs_efficient():
    """A mask_mod given to the op (one GPU, a ring of one over a layout of four blocks' worth of
    positions): evaluated per block on the masked Triton kernels, with the tiles it hides
    dropped; within 1.5x the efficient SDPA kernel's own bf16 error under the same mask."""
    from ringcompile import ring_attention

    B, H, Hkv, S, D = 2, 8, 2, 2048, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=22)
    g = torch.Generator(device="cuda").manual_seed(5)
    tag = torch.randint(0, 4, (B, S), generator=g, device="cuda")

    def mask_mod(b, h, q_idx, kv_idx, tag):  # a band, and keys of the query's tag
        return ((q_idx - kv_idx).abs() < 300) & (tag[b, q_idx] == tag[b, kv_idx])

    idx = torch.arange(S, device="cuda")
    allowed = mask_mod(torch.arange(B, device="cuda")[:, None, None, None], 0,
                       idx[None, None, :, None], idx[None, None, None, :], tag)  # fmt: skip
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, mask_mod=mask_mod, mask_buffers=(tag,), enable_gqa=True)
    out.backward(dout)
    ours = [out.detach()] + [t.grad for t in leaves]
    _check_vs_efficient_sdpa(ours, q, k, v, dout, allowed)


def test_ring_of_one_bidirectional_padding_vs_efficient():
    """Key padding without causality on a ring of one: the block goes to the Triton dq kernel,
    which writes dq (and the dk/dv kernel dK/dV) straight in bf16, with no fp32 buffer; within
    1.5x the efficient SDPA kernel's own bf16 error."""
    from ringcompile import ring_attention

    B, H, Hkv, S, D = 2, 8, 2, 2048, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=23)
    valid = torch.arange(S, device="cuda")[None] < torch.tensor([[S], [S - 300]], device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, key_padding_mask=valid, enable_gqa=True, kernels="triton")
    out.backward(dout)
    ours = [out.detach()] + [t.grad for t in leaves]
    assert all(t.dtype == torch.bfloat16 for t in ours)
    _check_vs_efficient_sdpa(ours, q, k, v, dout, valid[:, None, None, :])


@pytest.mark.parametrize(
    "kind,kernels",
    [("causal", None), ("documents", None), ("window", None), ("padding", None),
     ("causal", "triton"), ("documents", "triton")],
)  # fmt: skip
def test_ring_attention_token_major_matches_contiguous(kind, kernels):
    """q, k and v laid out (B, S, H, D), as a model's projections give them, reach each kernel
    (cuDNN, FA2 varlen, Triton) with those strides: the output comes back in that layout, and it
    and the gradients agree with the same call on contiguous inputs within bf16."""
    from ringcompile import ring_attention

    B, H, Hkv, S, D = 2, 8, 2, 2048, 128
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=21)
    g = torch.Generator(device="cuda").manual_seed(4)
    kw = {"is_causal": True, "enable_gqa": True, "kernels": kernels}
    if kind == "documents":
        kw["document_ids"] = torch.cumsum(torch.rand(B, S, generator=g, device="cuda") < 1 / 300, 1)
    elif kind == "window":
        kw["window"] = (255, 0)
    elif kind == "padding":
        kw["key_padding_mask"] = torch.arange(S, device="cuda")[None] >= torch.tensor(
            [[0], [S // 8]], device="cuda"
        )
    results = []
    for token_major in (False, True):
        ins = [t.transpose(1, 2).contiguous().transpose(1, 2) if token_major else t.contiguous()
               for t in (q, k, v)]  # fmt: skip
        ins = [t.detach().requires_grad_() for t in ins]
        out = ring_attention(*ins, **kw)
        assert out.stride() == ins[0].stride(), (token_major, out.stride(), ins[0].stride())
        out.backward(dout)
        results.append([out.detach().float()] + [t.grad.float() for t in ins])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-2, f"{name}: {rel}"


@pytest.mark.parametrize("token_major", [False, True])
def test_chunks_run_as_one_batch_on_cudnn(monkeypatch, token_major):
    """Chunked attention on one GPU: every chunk is the same causal square, so the block goes to
    cuDNN as one batch of chunks (views of (B, S, H, D) memory, copies of (B, H, S, D)); within
    1.5x the efficient SDPA kernel's own bf16 error under the same mask."""
    from ringcompile import ring_attention
    from ringcompile.kernels import sdpa_blocks

    batches = []
    forward = sdpa_blocks.CudnnBlocks.forward
    monkeypatch.setattr(sdpa_blocks.CudnnBlocks, "forward",
                        lambda self, q, *a: batches.append(q.shape[0]) or forward(self, q, *a))  # fmt: skip
    B, H, Hkv, S, D, C = 2, 8, 2, 2048, 128, 512
    q, k, v, dout = _inputs(B, H, Hkv, S, D, seed=23)
    if token_major:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, is_causal=True, chunk=C, enable_gqa=True)
    out.backward(dout)
    assert batches == [B * S // C]
    ours = [out.detach()] + [t.grad for t in leaves]
    pos = torch.arange(S, device="cuda")
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // C == pos[:, None] // C)
    _check_vs_efficient_sdpa(ours, q, k, v, dout, allowed)


@pytest.mark.parametrize("a,b", [(1, 0), (0, 1)], ids=["causal", "strictly_causal"])
def test_chunk_blocks_of_a_striped_ring_on_cudnn(tf, monkeypatch, a, b):
    """Blocks of a striped ring of 2 under chunks of 512 (the same causal, or strictly causal,
    piece in every chunk): one batched cuDNN call each way, rows that see nothing as such, and
    within 1.5x the efficient SDPA kernel's error."""
    from ringcompile.kernels import sdpa_blocks, select_kernels

    batches = []
    for name in ("forward", "backward"):
        fn = getattr(sdpa_blocks.CudnnBlocks, name)
        monkeypatch.setattr(sdpa_blocks.CudnnBlocks, name,
                            lambda self, x, *r, fn=fn: batches.append(x.shape[0]) or fn(self, x, *r))  # fmt: skip
    B, H, Hkv, S, D, C = 1, 8, 2, 2048, 128, 512
    q, k, v, dout = (t.transpose(1, 2).contiguous().transpose(1, 2)
                     for t in _inputs(B, H, Hkv, S, D, seed=24))  # fmt: skip
    i = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=a + 2 * i, k_pos=b + 2 * i, seq_len=2 * S,
                     rules=PositionRules(True, chunk=C), progression=(a, b, 2))  # fmt: skip
    allowed = mask.allowed()[:, None]
    # SDPA needs a key for every row: a row that sees none gets all, with no gradient flowing
    unseen = ~allowed.any(-1, keepdim=True)
    dout = dout.masked_fill(unseen, 0)
    _compare(tf, q, k, v, mask, dout, D**-0.5, "EFFICIENT_ATTENTION", False, allowed | unseen,
             kernels=select_kernels(q))  # fmt: skip
    assert batches == [B * 2 * S // C] * 2
