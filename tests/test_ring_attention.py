"""The ring op against F.scaled_dot_product_attention on the full sequence, in float64, on gloo worlds.

Every rank draws the same global tensors, shards them with the layout, runs the ring and compares
its rows of out and its rows of dq/dk/dv (loss = (out * w).sum() with random w, so gradients are
O(1)) with SDPA on the unsharded tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringcompile
from ringcompile import make_layout, ring_attention
from ringcompile.group import TwoLevel
from ringcompile.masks import AttentionMask, BlockMask, PositionRules
from ringcompile.ring import count_ring_events
from ringcompile.ring.backward import own_block_key_parts

LAYOUTS = ["contiguous", "striped", "zigzag"]
MASKS = ["full", "causal", "window", "chunk", "documents", "padding", "dense", "dense_additive"]
HEADS = [(4, 4), (8, 2), (4, 1)]  # (H, Hkv): MHA, GQA 4:1, MQA
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _problem(seed, B, H, Hkv, S, D, mask_kind):
    """Global inputs, ring_attention keyword arguments (full-sequence form) and SDPA's mask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    w = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    pos = torch.arange(S)
    kw: dict = {}
    allowed = torch.ones(B, 1, S, S, dtype=torch.bool)
    causal_tri = pos[None, :] <= pos[:, None]
    if mask_kind == "causal":
        kw["is_causal"] = True
        allowed &= causal_tri
    elif mask_kind == "window":
        kw.update(is_causal=True, window=(5, 0))
        allowed &= causal_tri & (pos[None, :] >= pos[:, None] - 5)
    elif mask_kind == "chunk":  # Llama 4's chunked attention, chunks not aligned to the shards
        kw.update(is_causal=True, chunk=5)
        allowed &= causal_tri & (pos[None, :] // 5 == pos[:, None] // 5)
    elif mask_kind == "chunk_bidirectional":
        kw["chunk"] = 4
        allowed &= pos[None, :] // 4 == pos[:, None] // 4
    elif mask_kind in ("chunk_of_6", "chunk_of_6_bidirectional"):  # chunks on runs of the shards
        kw["chunk"] = 6
        allowed &= pos[None, :] // 6 == pos[:, None] // 6
        if mask_kind == "chunk_of_6":
            kw["is_causal"] = True
            allowed &= causal_tri
    elif mask_kind.startswith("prefix"):
        # prefix-LM: the first 7 positions seen by every query, causal after them; with
        # documents, only inside each document (the prefix crosses ranks and ring steps)
        kw.update(is_causal=True, prefix=7)
        allowed &= causal_tri | (pos[None, :] < 7)
        if mask_kind == "prefix_documents":
            doc = (pos >= 11).long()[None].expand(B, S) + torch.arange(B)[:, None] * (pos >= 17)
            kw["document_ids"] = doc
            allowed &= doc[:, None, :, None] == doc[:, None, None, :]
    elif mask_kind == "window_bidirectional":
        kw["window"] = (3, 2)
        d = pos[None, :] - pos[:, None]
        allowed &= (d >= -3) & (d <= 2)
    elif mask_kind.startswith("documents"):
        # packed sequences: document boundaries differ per batch row; causal inside documents,
        # or with a window, chunks, or none; or ids that come back along a row
        starts = torch.rand(B, S, generator=g) < 0.2
        starts[:, 0] = True
        doc = starts.long().cumsum(1)
        if mask_kind == "documents_unsorted":
            doc = doc % 2
        if mask_kind == "documents_one":  # one document a row (unpacked): ids that hide nothing
            doc = torch.arange(B)[:, None].expand(B, S) + 3
        kw.update(is_causal=mask_kind != "documents_bidirectional", document_ids=doc)
        allowed &= doc[:, None, :, None] == doc[:, None, None, :]
        if kw["is_causal"]:
            allowed &= causal_tri
        if mask_kind == "documents_window":
            kw["window"] = (4, 0)
            allowed &= pos[None, :] >= pos[:, None] - 4
        if mask_kind == "documents_chunk":
            kw["chunk"] = 5
            allowed &= pos[None, :] // 5 == pos[:, None] // 5
    elif mask_kind == "padding":
        # row 0 padded on the left, row 1 on the right, as tokenizers do
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, :3] = False
        valid[-1, S - 4 :] = False
        kw.update(is_causal=True, key_padding_mask=valid)
        allowed &= causal_tri & valid[:, None, None, :]
    elif mask_kind in ("padding_idle", "padding_one_key"):
        # a tokenizer's all-ones attention_mask; or one key hidden, held by one rank
        valid = torch.ones(B, S, dtype=torch.bool)
        if mask_kind == "padding_one_key":
            valid[0, S - 1] = False
        kw.update(is_causal=True, key_padding_mask=valid)
        allowed &= causal_tri & valid[:, None, None, :]
    elif mask_kind == "dense":
        dense = torch.rand(B, H, S, S, generator=g) < 0.6
        dense[:, :, 1] = False  # a row that sees nothing
        kw["attn_mask"] = dense
        allowed = allowed & dense
    elif mask_kind == "dense_additive":
        bias = torch.randn(B, 1, S, S, generator=g, dtype=torch.float64)
        bias[..., 2, :] = float("-inf")  # a row that sees nothing
        kw["attn_mask"] = bias
        allowed = bias
    elif mask_kind == "dense_finfo_min":
        # transformers' float masks: finfo.min where a key is hidden; rows hidden everywhere
        # (left padding under ALiBi) get the mean of V from SDPA, every score rounding to min
        low = torch.finfo(torch.float64).min
        bias = torch.randn(B, 1, S, S, generator=g, dtype=torch.float64)
        bias[torch.rand(B, 1, S, S, generator=g) < 0.3] = low
        bias[..., 1::5, :] = low
        kw["attn_mask"] = bias
        allowed = bias
    elif mask_kind.startswith("mask_mod"):
        # flex's mask_mod at global positions, reading a full tensor by batch row, head and both
        # positions; row 1 sees no key. Each ring step evaluates it on its own block.
        tag = torch.randint(0, 3, (B, S), generator=g)

        def parity(b, h, q_idx, kv_idx, tag):
            return (((tag[b, q_idx] + tag[b, kv_idx] + h) % 2 == 0) | (kv_idx % 5 == 0)) & (
                q_idx != 1
            )

        kw.update(mask_mod=parity, mask_buffers=(tag,))
        idx = torch.arange(S)
        allowed = parity(torch.arange(B)[:, None, None, None], torch.arange(H)[None, :, None, None],
                         idx[:, None], idx[None, :], tag)  # fmt: skip
        if mask_kind == "mask_mod_documents":  # and-ed with the rules and facts
            doc = torch.cumsum(torch.rand(B, S, generator=g) < 0.2, 1)
            kw.update(is_causal=True, document_ids=doc)
            allowed = allowed & causal_tri & (doc[:, None, :, None] == doc[:, None, None, :])
    elif mask_kind == "mask_mod_bias":
        # a mask_mod that returns a float bias, -inf where hidden (flex's ALiBi score_mod with a
        # causal mask_mod, as the flex pass joins them)
        slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64)

        def alibi(b, h, q_idx, kv_idx, slopes):
            return torch.where(kv_idx <= q_idx, slopes[h] * (kv_idx - q_idx), float("-inf"))

        kw.update(mask_mod=alibi, mask_buffers=(slopes,))
        idx = torch.arange(S)
        allowed = alibi(0, torch.arange(H)[None, :, None, None], idx[:, None], idx[None, :], slopes)
    elif mask_kind == "key_bias":
        # Falcon's ALiBi under left padding, lifted: a per-head bias growing with the key's
        # position, causal, key padding; SDPA gets transformers' float mask, finfo.min where a
        # key is hidden, so the padded rows (no key) average every value
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, :3] = False
        slopes = 2.0 ** -torch.arange(1, H + 1, dtype=torch.float64)
        bias = slopes[None, :, None] * (valid.long().cumsum(1) - 1).clamp_min(0)[:, None, :]
        kw.update(is_causal=True, key_padding_mask=valid, key_bias=bias, empty_rows="mean")
        keep = causal_tri & valid[:, None, None, :]
        allowed = torch.where(keep, bias[:, :, None, :], torch.finfo(torch.float64).min)
    return q, k, v, w, kw, allowed


def _sdpa_reference(q, k, v, w, allowed, math=False):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _eager_reference(q, k, v, w, allowed, softcap):
    """``softmax(softcap * tanh(scale q.k / softcap) + mask) V`` written out (SDPA has no soft cap),
    as eager Gemma 2 computes it; rows a boolean mask leaves with no key give 0, as the ring."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    kx, vx = (t.repeat_interleave(G, 1) for t in (k, v))
    s = q @ kx.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = softcap * torch.tanh(s / softcap)
    if allowed.dtype == torch.bool:
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    else:
        p = (s + allowed).softmax(-1)
    out = p @ vx
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _shard_kwargs(kw, layout, rank):
    local = dict(kw)
    if "document_ids" in kw:
        local["document_ids"] = layout.shard(kw["document_ids"], 1, rank)
    if "key_padding_mask" in kw:
        # padding of an uneven layout shards as False: padded slots are no real keys either
        local["key_padding_mask"] = layout.shard(kw["key_padding_mask"], 1, rank)
    if "attn_mask" in kw:
        local["attn_mask"] = layout.shard(kw["attn_mask"], 2, rank)  # this rank's rows, all keys
    if "key_bias" in kw:
        local["key_bias"] = layout.shard(kw["key_bias"], 2, rank)
    return local


def check_against_sdpa(
    rank, world, layout_name, mask_kind, H, Hkv, S, seed, group=None, kernels=None, strategy="ring",
    softcap=None, token_major=False,
):  # fmt: skip
    """Returns this rank's relative errors (out, dq, dk, dv) against SDPA on the full sequence
    (with ``softcap``, against that attention written out)."""
    B, D = 2, 8
    q, k, v, w, kw, allowed = _problem(seed, B, H, Hkv, S, D, mask_kind)
    if softcap is not None:
        # scores of O(3): a cap of 2 bends most of them
        q = q * 2
        ref = _eager_reference(q, k, v, w, allowed, softcap)
        kw["softcap"] = softcap
    else:
        # rows a float mask fills with finfo.min everywhere: SDPA's CPU flash kernel differs
        # from its own math backend there (its backward reads an lse that lost log(n): 7x off);
        # math is exact
        ref = _sdpa_reference(q, k, v, w, allowed,
                              math=mask_kind in ("dense_finfo_min", "key_bias"))  # fmt: skip
    if isinstance(group, TwoLevel):  # the layout over the ring dim, split over the heads dim
        layout_name, pg = group.layout_name(layout_name), group.whole
    else:
        pg = group
    ring_size = pg.size() if pg is not None else world
    ring_rank = pg.rank() if pg is not None else rank
    layout = make_layout(layout_name, S, ring_size)
    local = [layout.shard(t, 2, ring_rank) for t in (q, k, v)]
    if token_major:  # (B, S, H, D) memory, as a model's projections give it
        local = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in local]
    for t in local:
        t.requires_grad_()
    out = ring_attention(
        *local,
        enable_gqa=H != Hkv,
        group=group,
        layout=layout,
        kernels=kernels,
        strategy=strategy,
        **_shard_kwargs(kw, layout, ring_rank),
    )
    (out * layout.shard(w, 2, ring_rank)).sum().backward()
    got = [out.detach()] + [t.grad for t in local]
    want = [layout.shard(t, 2, ring_rank) for t in ref]
    # rows at padded positions of an uneven layout are no tokens: their outputs are dropped
    real = layout.positions(ring_rank) < S
    return [_rel(a[:, :, real], b[:, :, real]) for a, b in zip(got, want)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_matches_sdpa(gloo, world, layout_name, mask_kind, heads):
    H, Hkv = heads
    S = 24  # divisible by 2W for every W here: no padding
    errs = gloo(world).run(check_against_sdpa, layout_name, mask_kind, H, Hkv, S, 7)
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize(
    "mask_kind", ["full", "causal", "window_bidirectional", "chunk_bidirectional", "padding"]
)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_uneven_length_is_padded_exactly(gloo, world, layout_name, mask_kind):
    S = 21  # no W here divides it evenly into 2W chunks
    assert make_layout(layout_name, S, world).pad > 0 or layout_name != "zigzag"
    errs = gloo(world).run(check_against_sdpa, layout_name, mask_kind, 4, 2, S, 11)
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("S", [24, 21])
def test_reference_kernels_for_plain_blocks(gloo, world, layout_name, S):
    # by default plain blocks run on the fused SDPA kernel; kernels="reference" computes them in
    # plain PyTorch: the same answer
    errs = gloo(world).run(check_against_sdpa, layout_name, "causal", 4, 2, S, 13, None,
                           "reference")  # fmt: skip
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


def test_kernel_choices():
    from ringcompile.kernels import plan_kernels

    q = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    assert plan_kernels(q.device, q.dtype, 8).names() == {
        "plain": "flash (CPU)", "varlen": "reference", "masked": "reference"
    }  # fmt: skip
    assert set(plan_kernels(q.device, q.dtype, 8, "reference").names().values()) == {"reference"}
    # no Triton on the CPU: the kernels that merge take its place
    assert set(plan_kernels(q.device, q.dtype, 8, "triton").names().values()) == {"reference"}
    with pytest.raises(ValueError, match=r"kernels='cudnn' is not one of \['auto', 'triton'"):
        ring_attention(q, q, q, kernels="cudnn")


def test_a_registered_kernel_computes_its_kind_of_block_and_explain_names_it(monkeypatch):
    """Adding a kernel is its class and one ``KernelSpec``: placed first, it computes the plain
    blocks it declares it takes, and the step plan ``explain`` prints names it."""
    from ringcompile.kernels import ReferenceKernels, registry
    from ringcompile.ring import describe_steps

    seen = []

    class CountingKernels(ReferenceKernels):
        def forward_step(self, state, q, k, v, mask, scale, last):
            seen.append(mask.pieces)
            super().forward_step(state, q, k, v, mask, scale, last)

    spec = registry.KernelSpec("counting", frozenset({"plain"}), frozenset({"cpu"}),
                               frozenset({torch.float64}), 64, True, CountingKernels)  # fmt: skip
    monkeypatch.setattr(registry, "KERNELS", (spec,) + registry.KERNELS)
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(
        ring_attention(q, k, v, is_causal=True),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )
    assert len(seen) == 1 and seen[0] is not None  # the one plain block
    seen.clear()
    ring_attention(q, k, v, window=(2, 0))  # masked: not its kind
    assert not seen
    plan = registry.plan_kernels(q.device, q.dtype, 4)
    assert plan.names() == {"plain": "counting", "varlen": "reference", "masked": "reference"}
    lines = describe_steps(
        make_layout("striped", 8, 1), 0, AttentionMask(PositionRules(True)), plan
    )
    assert lines == ["step 0 (own block): causal diagonal -> counting"]
    assert registry.plan_kernels(q.device, q.dtype, 128).names()["plain"] == "flash (CPU)"


def test_kernel_choice_from_environment(monkeypatch):
    q = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    monkeypatch.setenv("RINGCOMPILE_KERNELS", "fastest")
    with pytest.raises(ValueError, match="RINGCOMPILE_KERNELS='fastest'"):
        ring_attention(q, q, q)
    monkeypatch.setenv("RINGCOMPILE_KERNELS", "reference")
    torch.testing.assert_close(
        ring_attention(q, q, q, is_causal=True),
        F.scaled_dot_product_attention(q, q, q, is_causal=True),
    )


@pytest.mark.parametrize("mask_kind", ["full", "causal"])
def test_rank_holding_only_padding(gloo, mask_kind):
    # 9 tokens over 4 ranks, contiguous: rank 3 holds positions 9..11, all padding, so it computes
    # no block of its own and its backward only passes accumulators on
    assert make_layout("contiguous", 9, 4).positions(3).min() >= 9
    errs = gloo(4).run(check_against_sdpa, "contiguous", mask_kind, 4, 2, 9, 5)
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


def check_idle_padding(rank, world, mask_kind):
    with count_ring_events() as counts:
        errs = check_against_sdpa(rank, world, "zigzag", mask_kind, 4, 2, 21, 3)
    return errs, counts.idle_padding_dropped


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("mask_kind", ["padding_idle", "padding_one_key"])
def test_key_padding_that_hides_nothing_is_dropped(gloo, world, mask_kind):
    """No rank's key validity hides a key (a tokenizer's all-ones attention_mask): every rank
    drops it, forward and backward, so its blocks are plain (the fastest kernel). One hidden key,
    on one rank, keeps it on every rank. Exact either way; 21 tokens pad the layout, and its
    padding slots (hidden, but no keys) do not count."""
    for rank, (errs, dropped) in enumerate(gloo(world).run(check_idle_padding, mask_kind)):
        assert max(errs) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {errs}"
        assert dropped == (2 if mask_kind == "padding_idle" else 0), (rank, dropped)


def padding_answers(rank, world, hides_nothing):
    """How often this rank computes whether its key validity hides a key, and how often a ring of
    one waits for the answer, over three layers' calls on one tensor and their backward, then one
    call after the tensor changes in place."""
    from ringcompile.ring import call as call_module
    from ringcompile.ring.comm import LocalRing

    computed, waited = [], []
    record, agree = call_module.record_event, LocalRing.start_agreement
    call_module.record_event = lambda t: computed.append(1) or record(t)
    LocalRing.start_agreement = lambda self, *a, **k: waited.append(1) or agree(self, *a, **k)
    try:
        B, H, S, D = 2, 2, 12, 4
        g = torch.Generator().manual_seed(rank)
        layout = make_layout("striped", S, world)
        q, k, v = (torch.randn(B, H, S // world, D, dtype=torch.float64, generator=g,
                               requires_grad=True) for _ in "qkv")  # fmt: skip
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, : 0 if hides_nothing else 3] = False
        valid = layout.shard(valid, 1, rank)
        group = torch.distributed.group.WORLD if world > 1 else None
        for _ in range(3):
            out = ring_attention(q, k, v, is_causal=True, key_padding_mask=valid, group=group,
                                 layout=layout)  # fmt: skip
        out.sum().backward()
        first = (len(computed), len(waited))
        valid.logical_not_().logical_not_()
        ring_attention(q, k, v, is_causal=True, key_padding_mask=valid, group=group, layout=layout)
        return first, (len(computed), len(waited))
    finally:
        call_module.record_event, LocalRing.start_agreement = record, agree


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("hides_nothing", [True, False])
def test_padding_is_asked_once_per_tensor(gloo, world, hides_nothing):
    """A model's layers and their backward share one tensor of key validity: whether it hides a
    key is computed once (an all-gather then waits for that alone, not for the GPU's queued work),
    and a ring of one waits for the answer once; a change in place asks again."""
    for first, then in gloo(world).run(padding_answers, hides_nothing):
        assert first == (1, 1 if world == 1 else 0), first
        assert then == (2, 2 if world == 1 else 0), then


def check_ring_smaller_than_world(rank, world, layout_name):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
    dp = mesh.get_local_rank("dp")
    # each ring holds a different batch: the seed differs between the dp rows
    errs = check_against_sdpa(
        rank, world, layout_name, "causal", 8, 2, 24, 100 + dp, group=mesh.get_group("cp")
    )
    via_mesh = ring_attention(
        *(torch.ones(1, 2, 12, 4, dtype=torch.float64) for _ in range(3)),
        group=(mesh, "cp"),
        layout=layout_name,
    )
    return dp, errs, via_mesh.shape


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_ring_smaller_than_world(gloo, layout_name):
    results = gloo(4).run(check_ring_smaller_than_world, layout_name)
    assert sorted(r[0] for r in results) == [0, 0, 1, 1]
    for rank, (dp, errs, shape) in enumerate(results):
        assert max(errs) < TOL, f"rank {rank} (dp {dp}): {errs}"
        assert shape == (1, 2, 12, 4)


def count_blocks(rank, world, layout_name, kw):
    S, D = 8 * world, 4
    layout = make_layout(layout_name, S, world)
    q, k, v = (
        layout.shard(torch.randn(1, 2, S, D, dtype=torch.float64), 2, rank).requires_grad_()
        for _ in range(3)
    )
    with count_ring_events() as counts:
        out = ring_attention(q, k, v, layout=layout, **kw)
    fwd = (counts.kv_blocks_sent, counts.steps_computed, counts.steps_skipped)
    with count_ring_events() as counts:
        out.sum().backward()
    bwd = (counts.kv_blocks_sent, counts.dkv_blocks_sent, counts.steps_computed)
    return fwd, bwd


@pytest.mark.parametrize(
    "layout_name, kw, fwd_sends, bwd_kv_sends",
    [
        # full and causal rings visit every block
        ("contiguous", {}, 3, 3),
        ("striped", {"is_causal": True}, 3, 3),
        ("zigzag", {"is_causal": True}, 3, 3),
        # with 8 tokens a rank, a window reaching 8 back needs only the previous rank's block
        ("contiguous", {"is_causal": True, "window": (8, 0)}, 1, 1),
        # ... and one reaching 9 back needs the one before it too
        ("contiguous", {"is_causal": True, "window": (9, 0)}, 2, 2),
        # chunks of 8 are the ranks' own blocks: no step leaves a rank; causal chunks of 16
        # need the previous rank's block at most
        ("contiguous", {"is_causal": True, "chunk": 8}, 0, 0),
        ("contiguous", {"is_causal": True, "chunk": 16}, 1, 1),
    ],
)
def test_blocks_sent(gloo, layout_name, kw, fwd_sends, bwd_kv_sends):
    results = gloo(4).run(count_blocks, layout_name, kw)
    for rank, (fwd, bwd) in enumerate(results):
        assert fwd[0] == fwd_sends, (rank, fwd)
        assert bwd[0] == bwd_kv_sends, (rank, bwd)
        # one dK/dV accumulator per remote step; the own block's stays home
        assert bwd[1] == fwd_sends, (rank, bwd)
    if layout_name == "contiguous" and kw.get("is_causal"):
        # rank 0 has no earlier rank: with a window it computes its own block only
        assert results[0][0][1] == 1
    if layout_name == "contiguous" and not kw:
        assert all(fwd[1] == 4 and fwd[2] == 0 for fwd, _ in results)


def mismatched_lengths(rank, world):
    S = 8 + rank  # rank 1 holds one token more: must raise on both ranks, not hang
    q = torch.randn(1, 2, S, 4)
    try:
        ring_attention(q, q, q)
    except ValueError as e:
        return str(e)
    return None


def test_mismatched_local_lengths_raise_on_every_rank(gloo):
    msgs = gloo(2).run(mismatched_lengths, timeout=60)
    for m in msgs:
        assert m is not None and "local sequence length" in m and "rank 1=9" in m


def opcheck_on_ring(rank, world):
    S, D = 4 * world, 8
    layout = make_layout("striped", S, world)
    q = torch.randn(2, 4, S // world, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, S // world, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, S // world, D, dtype=torch.float64, requires_grad=True)
    doc = torch.zeros(2, S // world, dtype=torch.int64)
    from ringcompile.group import group_name_of, resolve_group

    name = group_name_of(resolve_group())
    tag = torch.arange(S) % 3

    def mask_mod(b, h, q_idx, kv_idx, tag):
        return tag[q_idx] != tag[kv_idx]

    def token_major(t):  # (B, S, H, D) memory viewed (B, H, S, D), as a model's projections
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    # a masked ring (documents), a plain one (its blocks on the fused SDPA kernel), and a
    # mask_mod evaluated per step (its key among the ints, its buffer among the tensors), with
    # the inputs contiguous and token-major (the output then comes token-major, as the fake says)
    for mask in (AttentionMask(PositionRules(causal=True), document_ids=doc),
                 AttentionMask(PositionRules(causal=True)),
                 AttentionMask(PositionRules(causal=True), mask_mod=mask_mod, mask_buffers=(tag,))):  # fmt: skip
        for qkv in ((q, k, v), tuple(token_major(t) for t in (q, k, v))):
            args = (*qkv, *mask.encode(), 0.3, layout.name, S, name, "auto")
            torch.library.opcheck(torch.ops.ringcompile.ring_attention.default, args)
            out, _ = torch.ops.ringcompile.ring_attention(*args)
            assert out.stride() == qkv[0].stride(), (out.stride(), qkv[0].stride())
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_opcheck(gloo, world):
    assert all(gloo(world).run(opcheck_on_ring))


def test_single_process_is_plain_attention():
    # no torch.distributed at all
    q, k, v = (torch.randn(2, 4, 10, 8, dtype=torch.float64) for _ in range(3))
    out = ring_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"dropout_p": 0.1}, NotImplementedError, "dropout_p=0.0"),
        ({"k_heads": 3}, ValueError, "multiple of key/value heads"),
        ({"k_heads": 2}, ValueError, "enable_gqa=True"),
        ({"k_dtype": torch.float32}, TypeError, "share a dtype"),
        ({"k_device": "meta"}, ValueError, "one device"),
        ({"attn_mask": torch.ones(10, 10, dtype=torch.bool)[:, :9]}, ValueError, "broadcast"),
        ({"document_ids": torch.zeros(2, 9, dtype=torch.long)}, ValueError, "document_ids"),
        ({"key_padding_mask": torch.ones(2, 10)}, TypeError, "bool"),
        ({"layout": "spiral"}, ValueError, "unknown layout"),
    ],
)
def test_bad_input_errors(kwargs, error, words):
    kwargs = dict(kwargs)
    hk = kwargs.pop("k_heads", 4)
    k = torch.randn(
        2,
        hk,
        10,
        8,
        dtype=kwargs.pop("k_dtype", torch.float64),
        device=kwargs.pop("k_device", "cpu"),
    )
    q = torch.randn(2, 4, 10, 8, dtype=torch.float64)
    with pytest.raises(error, match=words):
        ring_attention(q, k, k, enable_gqa=kwargs.pop("enable_gqa", hk == 3), **kwargs)


def test_layouts_are_permutations_with_inverses():
    for name, S, W in itertools.product(LAYOUTS, [7, 16, 24, 30], [1, 2, 3, 4]):
        lay = make_layout(name, S, W)
        assert lay.padded_len % W == 0 and lay.padded_len >= S
        assert torch.equal(lay.perm.sort().values, torch.arange(lay.padded_len))
        assert torch.equal(lay.perm[lay.inverse], torch.arange(lay.padded_len))
        x = torch.randn(3, S)
        shards = torch.cat([lay.shard(x, 1, r) for r in range(W)], 1)
        assert torch.equal(lay.unshard(shards, 1), x)
        # gradients go back into place: each token's is the weight of the slot it went to
        x.requires_grad_()
        shards = torch.cat([lay.shard(x, 1, r) for r in range(W)], 1)
        w = torch.randn(3, lay.padded_len)
        (grad,) = torch.autograd.grad((shards * w).sum(), x, retain_graph=True)
        assert torch.equal(grad, w[:, lay.inverse[:S]])
        w = torch.randn(3, S)
        assert torch.equal(torch.autograd.grad((lay.unshard(shards, 1) * w).sum(), x)[0], w)
        if W > 1:  # copied back (index_copy_), not added (index_select's own backward)
            assert type(lay.shard(x, 1, W - 1).grad_fn).__name__ == "_SelectRowsBackward"
        if W == 1:  # a ring of one: the tensor itself, padded or cut back (no index ops)
            one = lay.shard(x, 1, 0)
            assert (one is x) == (lay.pad == 0)
            assert lay.unshard(one, 1).data_ptr() == one.data_ptr()
    assert make_layout("striped", 8, 2).positions(1).tolist() == [1, 3, 5, 7]
    assert make_layout("zigzag", 8, 2).positions(0).tolist() == [0, 1, 6, 7]
    assert make_layout("contiguous", 8, 2).positions(1).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="does not fit"):
        make_layout(ringcompile.StripedLayout(8, 2), 8, 4)


def test_block_mask_keys_is_the_column_slice():
    g = torch.Generator().manual_seed(0)
    B, Sq, Sk = 2, 6, 10
    mask = BlockMask(
        q_pos=torch.randperm(16, generator=g)[:Sq], k_pos=torch.randperm(16, generator=g)[:Sk],
        seq_len=14, rules=PositionRules(True, window_left=7),
        q_doc=torch.randint(0, 2, (B, Sq), generator=g),
        k_doc=torch.randint(0, 2, (B, Sk), generator=g),
        k_valid=torch.rand(B, Sk, generator=g) < 0.8,
        dense=torch.rand(B, 1, Sq, Sk, generator=g) < 0.7, positions_key=("layout", 0, 1),
    )  # fmt: skip
    part = mask.keys(3, 8)
    assert torch.equal(part.allowed(), mask.allowed()[..., 3:8])
    assert torch.equal(part.dense, mask.dense[..., 3:8])
    # kernels cache tile lists by positions_key: each slice has its own, the same one each time
    assert part.positions_key != mask.positions_key
    assert mask.keys(3, 8).positions_key == part.positions_key != mask.keys(0, 3).positions_key


def test_own_block_parts_cover_the_keys_later_half_first():
    assert own_block_key_parts(8192) == [(4096, 8192), (0, 4096)]
    assert own_block_key_parts(300) == [(128, 300), (0, 128)]  # split on a 128-key tile
    assert own_block_key_parts(9) == [(4, 9), (0, 4)]
    assert own_block_key_parts(1) == [(0, 1)]


def _call(layout_name, S, world, causal=True, window=None, documents=False):
    from ringcompile.ring import LocalRing, RankCall

    layout = make_layout(layout_name, S, world)
    q = torch.zeros(1, 2, layout.local_len, 4)
    docs = torch.zeros(1, layout.local_len, dtype=torch.int64) if documents else None
    mask = AttentionMask(PositionRules.of(causal, window), document_ids=docs)
    return RankCall.on(LocalRing(0, world), q, mask, layout, "auto")


def test_first_dkv_hop_travels_in_the_inputs_dtype_where_it_holds_one_contribution():
    from ringcompile.blocks import Piece
    from ringcompile.ring.plan import Step, first_hop_dtype

    bf16, f32 = torch.bfloat16, torch.float32
    for layout_name in LAYOUTS:  # every remote block of a causal ring is one plain piece or empty
        call = _call(layout_name, 64, 4)
        assert [call.first_hop_dtype(r, True, bf16, f32) for r in range(4)] == [bf16] * 4
        assert call.first_hop_dtype(1, False, bf16, f32) == f32  # masked kernels' accumulators
        assert call.first_hop_dtype(1, True, f32, f32) == f32
    # contiguous: rank 0's step 1 (rank 3's keys, all in its future) is skipped: zeros
    assert not _call("contiguous", 64, 4).steps[1].computed
    # per-element rules: the block goes to the masked kernels
    assert _call("zigzag", 64, 4, window=(5, 0)).first_hop_dtype(1, True, bf16, f32) == f32
    assert _call("zigzag", 64, 4, documents=True).first_hop_dtype(1, True, bf16, f32) == f32
    # pieces that share keys would add two rounded values in the half dtype
    shared = (Piece(0, 8, 0, 16, False), Piece(8, 16, 8, 16, False))
    assert first_hop_dtype(Step(1, 0, True, shared), True, bf16, f32) == f32
    apart = (Piece(0, 8, 8, 16, False), Piece(8, 16, 0, 8, False))
    assert first_hop_dtype(Step(1, 0, True, apart), True, bf16, f32) == bf16


def half_precision_errors(rank, world, layout_name, dtype):
    """This rank's relative errors (out, dq, dk, dv) of the ring in ``dtype`` (plain blocks on
    the CPU's fused kernel, first dK/dV hop in ``dtype``) and of SDPA in ``dtype``, both against
    SDPA in float64."""
    B, H, Hkv, S, D = 1, 4, 2, 16 * world, 16
    q, k, v, w, kw, allowed = _problem(5, B, H, Hkv, S, D, "causal")
    want = _sdpa_reference(q, k, v, w, allowed)
    sdpa = _sdpa_reference(*(t.to(dtype) for t in (q, k, v, w)), allowed)
    layout = make_layout(layout_name, S, world)
    local = [layout.shard(t, 2, rank).to(dtype).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, enable_gqa=True, layout=layout, is_causal=True)
    (out * layout.shard(w, 2, rank).to(dtype)).sum().backward()
    got = [out.detach()] + [t.grad for t in local]

    def rel(a, b):
        return _rel(a.double(), layout.shard(b, 2, rank))

    return [rel(a, b) for a, b in zip(got, want)], [
        _rel(layout.shard(a, 2, rank).double(), layout.shard(b, 2, rank))
        for a, b in zip(sdpa, want)
    ]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout_name", ["striped", "zigzag"])
def test_half_precision_ring_is_as_close_as_sdpa(gloo, world, layout_name):
    # the first dK/dV hop carries the fused kernel's bf16 values as they are: a sender and a
    # receiver disagreeing on its dtype would garble dk/dv (or fail the transfer)
    for rank, (ring, sdpa) in enumerate(gloo(world).run(half_precision_errors, layout_name,
                                                        torch.bfloat16)):  # fmt: skip
        for name, r, s in zip(("out", "dq", "dk", "dv"), ring, sdpa):
            assert r < 1.5 * s + 1e-3, f"rank {rank} {name}: ring {r:.2e}, SDPA {s:.2e}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("kernels", [None, "reference"])
def test_rows_a_float_mask_fills_with_finfo_min(gloo, world, layout_name, kernels):
    # each block of such a row has lse = min + log(n) = min: without the row offset the ring's
    # merges weighted every block 1 and returned the sum of their means
    errs = gloo(world).run(check_against_sdpa, layout_name, "dense_finfo_min", 4, 2, 24, 17, None,
                           kernels)  # fmt: skip
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("heads", [(4, 2), (4, 1)])
def test_key_bias_with_rows_that_see_no_key(gloo, world, layout_name, heads):
    """ALiBi lifted (issue 21): a per-head bias of each key travels with it, and rows that the
    causal and padding rules leave with no key get the mean of every value, with SDPA's gradients
    (it differentiates through scores rounded to finfo.min), as SDPA gives under transformers'
    float mask."""
    errs = gloo(world).run(check_against_sdpa, layout_name, "key_bias", *heads, 24, 5)
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


SOFTCAP_CASES = [(1, "contiguous", "padding", "ring"), (2, "striped", "causal", "ring"),
                 (2, "zigzag", "documents", "ring"), (2, "contiguous", "dense_finfo_min", "ring"),
                 (3, "zigzag", "window", "ring"), (4, "striped", "padding", "ring"),
                 (4, "contiguous", "full", "ring"), (2, "zigzag", "documents", "ulysses"),
                 (3, "striped", "mask_mod_documents", "ring")]  # fmt: skip


@pytest.mark.parametrize("world, layout_name, mask_kind, strategy", SOFTCAP_CASES)
def test_soft_capped_scores(gloo, world, layout_name, mask_kind, strategy):
    """Gemma 2's soft cap on the ring (and Ulysses): ``softcap * tanh(s / softcap)`` of every
    score before the mask, its derivative in the backward; a dense float mask is added after the
    cap, and its rows hidden everywhere average every value, as eager attention gives them."""
    errs = gloo(world).run(check_against_sdpa, layout_name, mask_kind, 4, 2, 24, 3, None, None,
                           strategy, 2.0)  # fmt: skip
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("mask_kind", ["mask_mod", "mask_mod_documents", "mask_mod_bias"])
def test_mask_mod_per_step(gloo, world, layout_name, mask_kind):
    """flex's mask_mod given to the ring: each step evaluates it on its block at the layout's
    global positions (forward and backward), and-ed with causality and documents, exactly; one
    that returns a float bias (-inf where hidden) is an additive mask."""
    errs = gloo(world).run(check_against_sdpa, layout_name, mask_kind, 4, 2, 24, 5)
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


def test_mask_mod_closures_made_per_call_are_freed():
    """A lambda made per call, held by nothing but the call: its backward still finds it (the
    autograd graph holds it), and once the graph is gone so is the table's entry."""
    import gc

    from ringcompile import mask_mod

    q = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    before = len(mask_mod._TABLE)
    for shift in range(3):
        tag = (torch.arange(8) + shift) % 2
        out = ring_attention(
            q, q, q, mask_mod=lambda b, h, q_idx, kv_idx: tag[q_idx] == tag[kv_idx]
        )
        out.sum().backward()
        allowed = tag[:, None] == tag[None, :]
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=allowed))
    del out
    gc.collect()
    assert len(mask_mod._TABLE) == before


def test_mask_mod_refusals():
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)

    def every(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    with pytest.raises(ValueError, match="mask_mod with an attn_mask"):
        ring_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), mask_mod=every)
    with pytest.raises(ValueError, match="mask_buffers without a mask_mod"):
        ring_attention(q, q, q, mask_buffers=(q,))
    with pytest.raises(ValueError, match="takes no mask_mod"):
        ring_attention(q, q, q, mask_mod=every, strategy="ulysses")
    with pytest.raises(TypeError, match="must return booleans"):
        ring_attention(q, q, q, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx + 1)  # integers


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("mask_kind", ["prefix", "prefix_documents"])
def test_prefix_lm(gloo, world, layout_name, mask_kind):
    """A bidirectional prefix beside causality (``prefix=7``): exact on every layout, alone and
    inside documents, on the ring and (where the heads split) by Ulysses."""
    strategies = ["ring"] + (["ulysses"] if world in (2, 4) else [])
    for strategy in strategies:
        errs = gloo(world).run(check_against_sdpa, layout_name, mask_kind, 4, 2, 24, 13, None,
                               None, strategy)  # fmt: skip
        for rank, e in enumerate(errs):
            assert max(e) < TOL, f"{strategy}, rank {rank}: rel errors (out, dq, dk, dv) = {e}"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("mask_kind", ["causal", "documents", "padding", "window"])
def test_token_major_inputs(gloo, world, layout_name, mask_kind):
    """q, k and v laid out (B, S, H, D), as a model's projections give them: K/V travel in that
    layout and the output comes back in it, exactly."""
    errs = gloo(world).run(check_against_sdpa, layout_name, mask_kind, 4, 2, 24, 5, None, None,
                           "ring", None, True)  # fmt: skip
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


def test_soft_cap_refuses_mean_rows():
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="dense additive attn_mask"):
        ring_attention(q, q, q, is_causal=True, softcap=5.0, empty_rows="mean")
    with pytest.raises(ValueError, match="positive"):
        ring_attention(q, q, q, softcap=0.0)
