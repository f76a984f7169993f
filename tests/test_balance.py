"""Work per rank (``ringcompile.ring.balance``): the pair counts against dense masks, what each
layout does to packed documents, and ``explain``'s report of a call's balance."""

import re

import pytest
import torch
import torch.nn.functional as F

import ringcompile
from ringcompile.layout import make_layout
from ringcompile.masks import BlockMask, PositionRules
from ringcompile.ring.balance import Balance, pairs_per_step

RULES = [PositionRules(True), PositionRules(False), PositionRules.of(True, (5, -1)),
         PositionRules.of(False, (3, 4)), PositionRules.of(True, None, 7),
         PositionRules.of(True, None, None, 9), PositionRules.of(True, (2, -1), None, 6)]  # fmt: skip


def _sharded(layout, x, fill):
    return torch.cat([layout.shard(x, 1, r, fill=fill) for r in range(layout.world_size)], 1)


def _dense_pairs(layout, rules, doc, valid):
    """``pairs_per_step`` by building every block's boolean mask."""
    W, n, S = layout.world_size, layout.local_len, layout.seq_len
    pairs = torch.zeros((W, W), dtype=torch.int64)
    for r in range(W):
        for s in range(W):
            src = (r - s) % W
            q, k = slice(r * n, (r + 1) * n), slice(src * n, (src + 1) * n)
            block = BlockMask(q_pos=layout.positions(r), k_pos=layout.positions(src), seq_len=S,
                              rules=rules, q_doc=doc[:, q], k_doc=doc[:, k],
                              k_valid=valid[:, k])  # fmt: skip
            pairs[r, s] = (block.allowed() & (layout.positions(r) < S)[None, :, None]).sum()
    return pairs


@pytest.mark.parametrize("layout", ["contiguous", "striped", "zigzag", "zigzag/2"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("rules", RULES, ids=str)
def test_pairs_are_the_dense_masks_count(layout, world, rules):
    torch.manual_seed(world)
    S, B = 37, 2  # a length no layout divides: padded queries and keys
    lay = make_layout(layout, S, world * (2 if "/" in layout else 1))
    doc = torch.cumsum(torch.rand(B, S) < 0.15, 1) * 7 - 3  # any integers name documents
    valid = torch.rand(B, S) < 0.8
    doc, valid = _sharded(lay, doc, 0), _sharded(lay, valid, True)
    assert torch.equal(pairs_per_step(lay, rules, doc, valid), _dense_pairs(lay, rules, doc, valid))


def test_one_causal_sequence():
    # contiguous: rank r's queries see r whole blocks and its own triangle; zigzag and striped
    # spread the triangle
    n = 8
    want = torch.tensor([r * n * n + n * (n + 1) // 2 for r in range(4)])
    contiguous = Balance("contiguous", pairs_per_step(make_layout("contiguous", 32, 4),
                                                      PositionRules(True)))  # fmt: skip
    assert torch.equal(contiguous.per_rank, want)
    assert contiguous.imbalance == pytest.approx(int(want.max()) / float(want.double().mean()))
    # striped: query i * W + r sees i * W + r + 1 keys, one more a row than rank r - 1's
    striped = pairs_per_step(make_layout("striped", 32, 4), PositionRules(True)).sum(1)
    assert torch.equal(
        striped, torch.tensor([4 * n * (n - 1) // 2 + n * (r + 1) for r in range(4)])
    )
    zigzag = pairs_per_step(make_layout("zigzag", 32, 4), PositionRules(True)).sum(1)
    assert torch.equal(zigzag, zigzag[:1].expand(4))


def _random_pack(S: int, shortest: int, longest: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < S:
        lengths.append(int(torch.randint(shortest, longest + 1, (), generator=g)))
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:S][None]


def test_packed_documents_per_layout():
    # striped and zigzag spread causal work; on documents only striped spreads each document
    S, W = 8192, 4
    worst = {}
    for seed in range(3):
        doc = _random_pack(S, 256, 1024, seed)
        for name in ("contiguous", "striped", "zigzag"):
            lay = make_layout(name, S, W)
            b = Balance(name, pairs_per_step(lay, PositionRules(True), _sharded(lay, doc, 0)))
            worst[name] = max(worst.get(name, 0), b.imbalance)
    assert worst["striped"] <= 1.01, worst
    assert worst["zigzag"] > 1.05 and worst["contiguous"] > 1.05, worst


def _attend_documents(x, pos):
    """Causal attention inside the documents where ``pos`` restarts (transformers' packing)."""
    B, S, _ = x.shape
    q = x.view(B, S, 2, 4).transpose(1, 2)
    doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    i = torch.arange(S)
    b, qi, ki = torch.arange(B)[:, None, None, None], i[None, None, :, None], i[None, None, None, :]
    return F.scaled_dot_product_attention(
        q, q, q, attn_mask=(ki <= qi) & (doc[b, qi] == doc[b, ki])
    )


def explain_documents(rank, world, layout):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 60, 8, dtype=torch.float64)
    pos = torch.stack([torch.cat([torch.arange(45), torch.arange(15)]), torch.arange(60)])
    report = ringcompile.explain(_attend_documents, x, pos, options={
        "compiler": "aot_eager", "layout": layout, "strategy": "ring"})  # fmt: skip
    lay = make_layout(layout, 60, world)
    doc = torch.tensor([[0] * 45 + [1] * 15, [0] * 60])
    want = Balance(layout, _dense_pairs(lay, PositionRules(True), _sharded(lay, doc, 0),
                                        torch.ones(2, lay.padded_len, dtype=torch.bool)))  # fmt: skip
    return str(report), str(want)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_explain_shows_the_calls_balance(gloo, layout):
    for text, want in gloo(2).run(explain_documents, layout):
        section = text.split("=== work per rank on this call's data ===\n")[1]
        assert section == f"  - 1 ring call: causal, documents over 2 ranks, {want}", section
        assert re.search(r"max / mean 1\.\d{3} \(rank \d: [\d.]+k? of [\d.]+k?\)", want), want
