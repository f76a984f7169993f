"""Two levels (``strategy="two-level"``): an all-to-all over heads inside each group of one mesh
dim and a ring of such groups along the other, against F.scaled_dot_product_attention on the full
sequence in float64, on gloo worlds of 4 (2 x 2 meshes in both orders) and 8 ranks
(a (dp, heads, ring) mesh).
"""

from __future__ import annotations

import pytest
from test_ring_attention import TOL, check_against_sdpa

from ringcompile.group import resolve_two_level

LAYOUTS = ["contiguous", "striped", "zigzag"]
MASKS = [
    "full",
    "causal",
    "window",
    "chunk",
    "documents",
    "documents_window",
    "padding",
    "key_bias",
]
HEADS = [(4, 4), (8, 2), (4, 1)]


def _assert_exact(errs) -> None:
    for rank, e in enumerate(errs):
        assert max(e) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {e}"


def two_level_check(rank, world, shape, names, layout_name, mask_kind, H, Hkv, S):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    dp = mesh.get_local_rank("dp") if "dp" in names else 0
    two = resolve_two_level(mesh, ("heads", "ring"))
    return check_against_sdpa(rank, world, layout_name, mask_kind, H, Hkv, S, 7 + dp, group=two,
                              strategy="two-level")  # fmt: skip


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}kv{h[1]}")
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_matches_sdpa_on_a_two_by_two_mesh(gloo, layout_name, mask_kind, heads):
    _assert_exact(gloo(4).run(two_level_check, (2, 2), ("ring", "heads"), layout_name, mask_kind,
                              *heads, 24))  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["causal", "documents", "padding"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_heads_dim_first_in_the_mesh(gloo, layout_name, mask_kind):
    # a head group's ranks are then 2 apart, the ring's neighbours
    _assert_exact(gloo(4).run(two_level_check, (2, 2), ("heads", "ring"), layout_name, mask_kind,
                              8, 2, 24))  # fmt: skip


@pytest.mark.parametrize("shape", [(4, 1), (1, 4)], ids=["heads-of-one", "ring-of-one"])
def test_a_level_of_one(gloo, shape):
    _assert_exact(gloo(4).run(two_level_check, shape, ("ring", "heads"), "zigzag", "documents",
                              8, 2, 24))  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["full", "causal", "documents", "padding"])
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_uneven_length_is_padded_exactly(gloo, layout_name, mask_kind):
    # 21 tokens: every layout pads to a multiple of 2 ring ranks x 2 pieces (zigzag: x 2 chunks)
    _assert_exact(gloo(4).run(two_level_check, (2, 2), ("ring", "heads"), layout_name, mask_kind,
                              4, 2, 21))  # fmt: skip


def _mesh(shape=(2, 2), names=("ring", "heads")):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def backend_two_levels(rank, world, option, heads):
    """``backend_strategies`` of test_ulysses on a 2 x 2 mesh."""
    from test_ulysses import backend_strategies

    return backend_strategies(rank, world, option, heads,
                              {"group": _mesh(), "mesh_dim": ("heads", "ring")})  # fmt: skip


@pytest.mark.parametrize("option, heads, strategy, fallback", [
    ("auto", (4, 2), "two-level", False),
    ("two-level", (4, 2), "two-level", False),
    ("ring", (4, 2), "ring", False),
    ("ulysses", (4, 2), "ulysses", False),  # over all 4 ranks
    ("two-level", (3, 3), "ring", True),  # 3 heads do not split over 2 ranks: a ring, listed
    ("auto", (3, 3), "ring", False),
])  # fmt: skip
def test_backend_strategy_option(gloo, option, heads, strategy, fallback):
    for rank, (errs, graph) in enumerate(gloo(4).run(backend_two_levels, option, heads)):
        assert max(errs) < TOL, errs
        (line,) = graph.attention
        assert line.split("; ")[1].startswith(f"{strategy}: "), line
        assert bool(graph.fallbacks) == fallback, graph.fallbacks
        assert (f"strategy = '{strategy}'" in graph.code) == (strategy != "ring"), graph.code
        if strategy == "two-level":  # explain's account: the head group, then the ring's steps
            ((title, _, _, lines),) = graph.steps
            ring_rank, piece = divmod(rank, 2)
            assert title == "two levels on this rank" and lines[:2] == [
                f"all-to-all over heads inside a group of 2 ranks (this rank holds piece {piece} "
                f"of ring rank {ring_rank}'s tokens): 2 of 4 query heads and 1 of 2 KV heads",
                "then a ring of 2 over the striped layout, as ring rank "
                f"{ring_rank}:"], lines  # fmt: skip


def hf_two_levels(rank, world, arch, seq_len, mask, names):
    from test_transformers import compare_hf

    options = {"group": _mesh((2, 2), names), "mesh_dim": ("heads", "ring"), "layout": "zigzag"}
    return compare_hf(rank, world, arch, seq_len, mask, False, options=options)


@pytest.mark.parametrize("arch, seq_len, mask, names", [
    ("llama", 16, "left", ("ring", "heads")),
    ("qwen2", 15, "packed", ("heads", "ring")),
    ("mistral", 16, "packed", ("ring", "heads")),
])  # fmt: skip
def test_transformers_models_are_exact(gloo, arch, seq_len, mask, names):
    from test_transformers import _assert_exact as assert_hf_exact

    results = gloo(4).run(hf_two_levels, arch, seq_len, mask, names)
    assert_hf_exact(results)
    (graph,) = results[0][1]
    assert graph.fallbacks == [], graph.fallbacks
    assert [a.split("; ")[1].split(":")[0] for a in graph.attention] == ["two-level"] * 2


def opcheck_two_levels(rank, world, names):
    from test_ulysses import opcheck_ulysses

    return opcheck_ulysses(rank, world, resolve_two_level(_mesh((2, 2), names), ("heads", "ring")))


@pytest.mark.parametrize("names", [("ring", "heads"), ("heads", "ring")])
def test_opcheck(gloo, names):
    assert all(gloo(4).run(opcheck_two_levels, names))


@pytest.mark.parametrize("shape, names", [
    ((2, 2, 1), ("dp", "ring", "heads")),
    ((2, 1, 2), ("dp", "heads", "ring")),
])  # fmt: skip
def test_data_parallel_rows_keep_their_batches(gloo, shape, names):
    # each dp row is a two-level group of its own, with its own batch (the seed differs)
    _assert_exact(gloo(4).run(two_level_check, shape, names, "zigzag", "documents", 8, 2, 24))


def two_levels_mismatched(rank, world):
    import torch

    from ringcompile import ring_attention

    q = torch.randn(1, 4, 8 + (rank == 3), 4)  # rank 3 holds one token more
    two = resolve_two_level(_mesh(), ("heads", "ring"))
    with pytest.raises(ValueError) as e:
        ring_attention(q, q, q, group=two, strategy="two-level")
    return str(e.value)


def test_mismatched_local_lengths_raise_on_every_rank(gloo):
    # checked over all four ranks at once, before any all-to-all or ring step
    for msg in gloo(4).run(two_levels_mismatched, timeout=60):
        assert "local sequence length" in msg and "rank 3=9" in msg, msg


def misuses(rank, world):
    import torch

    import ringcompile
    from ringcompile import ring_attention
    from ringcompile.errors import RingCompileError

    q = torch.randn(1, 4, 8, 4)
    said = []
    for group, dims in [(_mesh(), ("heads", "heads")), (_mesh(), ("heads", "tp")),
                        (None, ("heads", "ring"))]:  # fmt: skip
        with pytest.raises(ValueError) as e:
            ring_attention(q, q, q, group=group, mesh_dim=dims, strategy="two-level")
        said.append(str(e.value))
    with pytest.raises(ValueError) as e:
        ring_attention(q, q, q, strategy="two-level")
    said.append(str(e.value))
    with pytest.raises(RingCompileError) as e:
        ringcompile.explain(lambda x: x, q, options={"strategy": "two-level"})
    said.append(str(e.value))
    from torch.distributed.device_mesh import DeviceMesh

    # ranks not in row-major order: every rank of the group sees it and raises
    odd = DeviceMesh("cpu", torch.tensor([[0, 2], [1, 3]]), mesh_dim_names=("ring", "heads"))
    with pytest.raises(ValueError) as e:
        resolve_two_level(odd, ("heads", "ring"))
    said.append(str(e.value))
    return said


def test_misuses_name_the_fix(gloo):
    for said in gloo(4).run(misuses):
        assert "must name two different dims of the mesh" in said[0], said[0]
        assert "('ring', 'heads')" in said[1], said[1]
        assert "name two dims of a DeviceMesh" in said[2], said[2]
        assert "needs two mesh dims" in said[3] and "needs two mesh dims" in said[4], said[3:]
        assert "[0, 2, 1, 3] out of order" in said[5], said[5]


def generate_two_levels(rank, world, names):
    from test_decode import generate_hf

    options = {"group": _mesh((2, 2), names), "mesh_dim": ("heads", "ring")}
    return generate_hf(rank, world, "llama", "zigzag", 13, 4, options=options)


def test_decoding_stays_tree_attention_over_every_rank(gloo):
    """A two-level prefill fills the cache in its split layout (heads dim first: a head group's
    ranks 2 apart); each decode step is tree attention over all four ranks' shards."""
    for same, err, _held, reports in gloo(4).run(generate_two_levels, ("heads", "ring")):
        assert same and err < TOL, (same, err)
        assert len(reports) == 2 and "two-level: " in reports[0], reports[0]
        assert "over the sharded KV cache (tree attention)" in reports[1], reports[1]


@pytest.mark.parametrize("option, heads, mask, strategy, words, refused", [
    ("auto", (4, 2), "causal", "two-level", "inside each group of 2 ranks, a ring of 4", False),
    ("two-level", (4, 2), "documents", "two-level", "(strategy='two-level')", False),
    ("auto", (6, 3), "causal", "ring", "3 KV heads over 2 ranks", False),
    ("two-level", (6, 3), "causal", "ring", "3 KV heads over 2 ranks", True),
    ("auto", (4, 2), "dense", "ring", "dense mask", False),
    ("ulysses", (8, 8), "causal", "ulysses", "strategy='ulysses'", False),  # over all 8 ranks
])  # fmt: skip
def test_choose(option, heads, mask, strategy, words, refused):
    from ringcompile.masks import AttentionMask, PositionRules
    from ringcompile.strategy import choose

    kinds = {"causal": AttentionMask(PositionRules(causal=True)), "dense": AttentionMask(dense="m"),
             "documents": AttentionMask(PositionRules(causal=True), document_ids="d")}  # fmt: skip
    choice = choose(option, *heads, 8, kinds[mask], heads_size=2)
    assert choice.strategy == strategy and words in choice.reason, choice
    assert (choice.refused is not None) == refused, choice
