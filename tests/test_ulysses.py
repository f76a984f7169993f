"""Ulysses (``strategy="ulysses"``, ``ringcompile.ulysses``) against F.scaled_dot_product_attention
on the full sequence, in float64, on gloo worlds; the strategy each site gets through the backend.

The op-level cases reuse ``test_ring_attention``'s problems: every rank draws the same global
tensors, shards them with the layout and compares its rows of out, dq, dk and dv with SDPA's.
"""

from __future__ import annotations

import pytest
import torch
from test_ring_attention import TOL, check_against_sdpa

import ringcompile
from ringcompile import make_layout, ring_attention
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.ring import count_ring_events
from ringcompile.strategy import choose
from ringcompile.ulysses import HeadSplit

LAYOUTS = ["contiguous", "striped", "zigzag"]
MASKS = ["full", "causal", "window", "chunk", "documents", "documents_window",
         "documents_unsorted", "padding", "key_bias"]  # fmt: skip
# (H, Hkv): MHA; GQA whose KV heads split; MQA, one KV head on every rank
HEADS = [(4, 4), (8, 2), (4, 1)]


def _assert_exact(errs) -> None:
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_matches_sdpa_on_two_ranks(gloo, layout_name, mask_kind, heads):
    H, Hkv = heads
    _assert_exact(gloo(2).run(check_against_sdpa, layout_name, mask_kind, H, Hkv, 24, 7, None,
                              None, "ulysses"))  # fmt: skip


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("mask_kind", ["causal", "documents", "padding", "key_bias"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_matches_sdpa_on_four_ranks(gloo, layout_name, mask_kind, heads):
    # (4, 1) and (8, 2): fewer KV heads than ranks, each KV head on several ranks
    H, Hkv = heads
    _assert_exact(gloo(4).run(check_against_sdpa, layout_name, mask_kind, H, Hkv, 24, 5, None,
                              None, "ulysses"))  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["full", "causal", "documents", "padding"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_uneven_length_is_padded_exactly(gloo, layout_name, mask_kind):
    # 21 tokens over 3 ranks leave every layout but contiguous with padding slots, which never
    # reach the attention between the all-to-alls
    _assert_exact(gloo(3).run(check_against_sdpa, layout_name, mask_kind, 6, 3, 21, 11, None,
                              None, "ulysses"))  # fmt: skip


def ulysses_smaller_than_world(rank, world, layout_name):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
    dp = mesh.get_local_rank("dp")
    # each group holds a different batch: the seed differs between the dp rows
    return check_against_sdpa(rank, world, layout_name, "documents", 8, 2, 24, 100 + dp,
                              group=mesh.get_group("cp"), strategy="ulysses")  # fmt: skip


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_group_smaller_than_world(gloo, layout_name):
    """All-to-alls over one dim of a (dp, cp) mesh, each dp row with its own batch."""
    _assert_exact(gloo(4).run(ulysses_smaller_than_world, layout_name))


def count_exchanges(rank, world, kw):
    S = 8 * world
    layout = make_layout("striped", S, world)
    q = torch.randn(1, 4, S // world, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, S // world, 8, dtype=torch.float64, requires_grad=True)
            for _ in range(2))  # fmt: skip
    local = {n: layout.shard(t, 1, rank) for n, t in kw.items()}
    with count_ring_events() as fwd:
        out = ring_attention(q, k, v, enable_gqa=True, is_causal=True, layout=layout,
                             strategy="ulysses", **local)  # fmt: skip
    with count_ring_events() as bwd:
        out.sum().backward()
    return [(c.all_to_alls, c.kv_blocks_sent, c.steps_computed) for c in (fwd, bwd)]


@pytest.mark.parametrize("kw, facts", [({}, 0), ({"document_ids": torch.arange(16)[None] // 5}, 1)])
def test_four_all_to_alls_and_no_ring_steps(gloo, kw, facts):
    """q, k, v and out forward, dout, dq, dk and dv backward; the document ids gathered once per
    op; nothing travels around a ring, and the attention is one step over the whole sequence."""
    for fwd, bwd in gloo(2).run(count_exchanges, kw):
        assert fwd == (4 + facts, 0, 1) and bwd == (4 + facts, 0, 1), (fwd, bwd)


def heads_that_do_not_split(rank, world, H, Hkv, dense):
    q = torch.randn(1, H, 4, 8)
    k = torch.randn(1, Hkv, 4, 8)
    mask = torch.ones(1, 1, 4, 4 * world, dtype=torch.bool) if dense else None
    with pytest.raises(ValueError) as e:
        ring_attention(q, k, k, mask, enable_gqa=H != Hkv, strategy="ulysses")
    return str(e.value)


@pytest.mark.parametrize("H, Hkv, dense, words", [
    (3, 3, False, "3 query heads do not divide over 2 ranks"),
    (6, 3, False, "3 KV heads over 2 ranks: neither divides the other"),
    (4, 2, True, "takes no attn_mask"),
])  # fmt: skip
def test_what_cannot_split_is_refused_with_the_fix(gloo, H, Hkv, dense, words):
    for msg in gloo(2).run(heads_that_do_not_split, H, Hkv, dense):
        assert words in msg and "strategy='ring'" in msg, msg


def mismatched_lengths(rank, world):
    q = torch.randn(1, 2, 8 + rank, 4)  # rank 1 holds one token more: raises on both ranks
    with pytest.raises(ValueError) as e:
        ring_attention(q, q, q, strategy="ulysses")
    return str(e.value)


def test_mismatched_local_lengths_raise_on_every_rank(gloo):
    for msg in gloo(2).run(mismatched_lengths, timeout=60):
        assert "local sequence length" in msg and "rank 1=9" in msg, msg


def opcheck_ulysses(rank, world, two=None):
    """opcheck of the op alone, or (``two``, a ``TwoLevel``) in two levels."""
    from ringcompile.group import SINGLE, group_name_of, resolve_group

    S, D = 4 * world, 8
    name = group_name_of(resolve_group(two))
    groups = (name, SINGLE) if two is None else tuple(map(group_name_of, (two.heads, two.ring)))
    layout = make_layout("zigzag" if two is None else two.layout_name("zigzag"), S, world)
    q = torch.randn(2, 4, S // world, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, S // world, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, S // world, D, dtype=torch.float64, requires_grad=True)
    doc = layout.shard(torch.arange(S).expand(2, -1) // 3, 1, rank)
    for facts in (doc, None):
        mask = AttentionMask(PositionRules(causal=True), document_ids=facts)
        args = (q, k, v, *mask.encode(), 0.3, layout.name, S, name, "auto", *groups)
        torch.library.opcheck(torch.ops.ringcompile.ulysses_attention.default, args)
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_opcheck(gloo, world):
    assert all(gloo(world).run(opcheck_ulysses))


def test_head_split():
    assert HeadSplit.of(8, 4, 2).kv_heads_of == ((0, 1), (2, 3))
    # fewer KV heads than ranks: each goes to the ranks whose query heads use it
    assert HeadSplit.of(8, 2, 4).kv_heads_of == ((0,), (0,), (1,), (1,))
    assert HeadSplit.of(4, 1, 4).kv_heads_of == ((0,), (0,), (0,), (0,))
    assert HeadSplit.of(12, 3, 3).q_per_rank == 4


_NONE = AttentionMask()
_DOCS = AttentionMask(PositionRules(causal=True), document_ids="d")


@pytest.mark.parametrize("option, heads, size, mask, strategy, words", [
    ("auto", (4, 2), 2, AttentionMask(PositionRules(causal=True)), "ring", "plain blocks"),
    ("auto", (4, 2), 2, _DOCS, "ulysses", "documents: attended once"),
    ("auto", (4, 2), 4, AttentionMask(PositionRules(True, 7, 0)), "ulysses", "window: attended"),
    ("auto", (4, 2), 2, AttentionMask(PositionRules(True, 7, 0)), "ring", "window on 2 ranks"),
    ("auto", (4, 2), 4, AttentionMask(key_bias="b"), "ulysses", "key bias"),
    ("auto", (4, 2), 2, AttentionMask(key_bias="b"), "ring", "key bias on 2 ranks"),
    ("auto", (4, 2), 2, AttentionMask(PositionRules(True), key_padding_mask="p"), "ring",
     "key padding alone"),
    ("auto", (4, 2), 2, AttentionMask(dense="m"), "ring", "dense mask"),
    ("auto", (6, 2), 4, _DOCS, "ring", "6 query heads do not divide over 4 ranks"),
    ("auto", (4, 2), 1, _DOCS, "ring", "a ring of one"),
    ("ring", (4, 2), 2, _DOCS, "ring", "strategy='ring'"),
    ("ulysses", (4, 2), 2, _NONE, "ulysses", "strategy='ulysses'"),
    ("ulysses", (4, 3), 2, _NONE, "ring", "3 KV heads over 2 ranks"),
])  # fmt: skip
def test_choose(option, heads, size, mask, strategy, words):
    choice = choose(option, *heads, size, mask)
    assert choice.strategy == strategy and words in choice.reason, choice
    assert (choice.refused is not None) == (option == "ulysses" and strategy == "ring")


def backend_strategies(rank, world, option, heads, options=None):
    """A packed causal attention through the backend with ``strategy=option`` (and ``options``):
    errors against eager and the report."""
    torch._dynamo.reset()
    H, Hkv = heads
    g = torch.Generator().manual_seed(3)
    S = 16
    q = torch.randn(1, H, S, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(1, Hkv, S, 8, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(2))  # fmt: skip
    w = torch.randn(1, H, S, 8, dtype=torch.float64, generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])

    def attend(q, k, v, docs):
        # a mask built from aranges and document ids, as transformers builds one
        b, idx = torch.arange(1)[:, None, None, None], torch.arange(S)
        q_idx, kv_idx = idx[None, None, :, None], idx[None, None, None, :]
        mask = (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=H != Hkv
        )

    options = {"compiler": "aot_eager", "strategy": option, **(options or {})}
    ref = attend(q, k, v, docs)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    report = ringcompile.explain(attend, q, k, v, docs, options=options)
    out = torch.compile(attend, backend="ring", options=options)(q, k, v, docs)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    pairs = zip((out, *grads), (ref, *ref_grads))
    errs = [float((a.detach() - b).norm() / b.norm()) for a, b in pairs]
    return errs, report.graphs[0]


@pytest.mark.parametrize("option, heads, strategy, fallback", [
    ("auto", (4, 2), "ulysses", False),
    ("ring", (4, 2), "ring", False),
    ("ulysses", (3, 3), "ring", True),  # 3 heads do not split over 2 ranks: a ring, listed
])  # fmt: skip
def test_backend_strategy_option(gloo, option, heads, strategy, fallback):
    for errs, graph in gloo(2).run(backend_strategies, option, heads):
        assert max(errs) < TOL, errs
        (line,) = graph.attention
        assert line.split("; ")[1].startswith(f"{strategy}: "), line
        assert bool(graph.fallbacks) == fallback, graph.fallbacks
        assert ("strategy = 'ulysses'" in graph.code) == (strategy == "ulysses"), graph.code
        if strategy == "ulysses":  # explain's account of the site: the heads, the one attention
            assert graph.steps == [("ulysses on this rank", ["scaled_dot_product_attention"],
                                    "torch.float64 on cpu, head dim 8",
                                    ["all-to-all over heads: 2 of 4 query heads and 1 of 2 KV heads",
                                     "the whole sequence of 16: varlen (documents) -> reference"])]  # fmt: skip


def fsdp2_llama(rank, world, strategy):
    """A tiny Llama under FSDP2 over the dp dim of a (dp, cp) mesh, its forward compiled with the
    ring over cp: every parameter gradient against one process on the whole batch."""
    from test_transformers import V, _model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    model, ref = _model("llama"), _model("llama")  # the same weights
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(5))
    rows = [ids[2 * i : 2 * i + 2] for i in range(2)]  # a batch of 2 rows per dp rank
    (sum(ref(input_ids=r, labels=r).loss for r in rows) / 2).backward()  # FSDP2 averages
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    options = {"group": mesh, "mesh_dim": "cp", "compiler": "aot_eager", "strategy": strategy}
    model.forward = torch.compile(model.forward, backend="ring", options=options)
    mine = rows[mesh.get_local_rank("dp")]
    model(input_ids=mine, labels=mine).loss.backward()
    return max(float((p.grad.full_tensor() - r.grad).norm() / r.grad.norm())
               for p, r in zip(model.parameters(), ref.parameters()))  # fmt: skip


def test_fsdp2_over_the_data_parallel_dim(gloo):
    # the ring's gradient sums over cp and FSDP2's reduce-scatter over dp are the same for both
    # strategies; Ulysses adds the all-to-alls' backward
    assert max(gloo(4).run(fsdp2_llama, "ulysses")) < TOL
