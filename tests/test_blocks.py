"""Block kinds: the pieces of a ring block cover exactly the pairs the position rules allow."""

from __future__ import annotations

import itertools

import pytest
import torch

from ringcompile.blocks import (
    Piece,
    chunk_piece,
    describe_block,
    layout_block_pieces,
    layout_progression,
    plain_pieces,
    restrict_keys,
)
from ringcompile.layout import make_layout
from ringcompile.masks import BlockMask, PositionRules


def _rules(mask: BlockMask) -> torch.Tensor:
    return mask.allowed()[0].expand(mask.q_pos.numel(), mask.k_pos.numel())


def _dense(pieces, sq, sk) -> torch.Tensor:
    allowed = torch.zeros(sq, sk, dtype=torch.bool)
    for p in pieces:
        block = torch.ones(p.row_stop - p.row_start, p.key_stop - p.key_start, dtype=torch.bool)
        if p.causal:
            assert block.shape[0] == block.shape[1], p  # fused kernels' causal is a square
            block = block.tril()
        assert not (allowed[p.rows, p.keys] & block).any(), "pieces overlap"
        allowed[p.rows, p.keys] |= block
    return allowed


CASES = [
    (name, S, W)
    for name in ("contiguous", "striped", "zigzag")
    for S, W in ((32, 4), (30, 4), (29, 3), (16, 2), (7, 2), (40, 1))
]


@pytest.mark.parametrize("name,S,W", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_pieces_are_the_rules(name, S, W, causal):
    layout = make_layout(name, S, W)
    n = layout.local_len
    for rank, src in itertools.product(range(W), range(W)):
        mask = BlockMask(
            q_pos=layout.positions(rank),
            k_pos=layout.positions(src),
            seq_len=S,
            rules=PositionRules(causal),
        )
        pieces = layout_block_pieces(layout, rank, src, causal)
        assert pieces is not None, (rank, src)
        assert torch.equal(_dense(pieces, n, n), _rules(mask)), (rank, src, pieces)
        # every key range, as the own block's backward parts cut it
        for lo, hi in ((0, n // 2), (n // 2, n), (1, n - 1), (3, 5)):
            if not 0 <= lo < hi <= n:
                continue
            part = restrict_keys(pieces, lo, hi)
            assert torch.equal(_dense(part, n, hi - lo), _rules(mask.keys(lo, hi))), (
                rank,
                src,
                lo,
                hi,
                part,
            )


def test_kinds_by_name():
    S = 64
    striped = make_layout("striped", S, 4)
    assert describe_block(layout_block_pieces(striped, 2, 2, True), 16, 16) == "causal diagonal"
    assert describe_block(layout_block_pieces(striped, 2, 1, True), 16, 16) == "causal diagonal"
    assert describe_block(layout_block_pieces(striped, 1, 2, True), 16, 16) == "strictly causal"
    assert describe_block(layout_block_pieces(striped, 1, 2, False), 16, 16) == "full"
    zigzag = make_layout("zigzag", S, 4)
    assert (
        describe_block(layout_block_pieces(zigzag, 2, 1, True), 16, 16) == "full q[0:16] x k[0:8]"
    )
    assert (
        describe_block(layout_block_pieces(zigzag, 1, 2, True), 16, 16) == "full q[8:16] x k[0:16]"
    )
    contiguous = make_layout("contiguous", S, 4)
    assert describe_block(layout_block_pieces(contiguous, 1, 2, True), 16, 16) == "empty"
    assert describe_block(None, 16, 16) == "masked"


def test_unsorted_positions_are_masked():
    q = torch.tensor([0, 2, 1, 3])
    assert plain_pieces(q, torch.arange(4), 4, True) is None
    assert plain_pieces(torch.arange(4), q, 4, False) is None


def test_random_sorted_positions():
    # any increasing positions: pieces or None, never a wrong cover
    g = torch.Generator().manual_seed(0)
    covered = 0
    for _ in range(300):
        q = torch.randperm(40, generator=g)[:12].sort().values
        k = torch.randperm(40, generator=g)[:9].sort().values
        seq_len = int(torch.randint(20, 41, (1,), generator=g))
        pieces = plain_pieces(q, k, seq_len, True)
        if pieces is None:
            continue
        covered += 1
        mask = BlockMask(q_pos=q, k_pos=k, seq_len=seq_len, rules=PositionRules(True))
        assert torch.equal(_dense(pieces, 12, 9), _rules(mask)), (q, k, seq_len, pieces)
    assert covered > 30


def test_piece_slices():
    p = Piece(1, 5, 0, 4, True)
    assert (p.rows, p.keys) == (slice(1, 5), slice(0, 4))


@pytest.mark.parametrize("name", ["contiguous", "striped", "zigzag"])
@pytest.mark.parametrize("S,W", [(24, 1), (24, 2), (24, 3), (22, 2), (48, 4)])
@pytest.mark.parametrize("chunk", [2, 4, 6, 5, 12])
@pytest.mark.parametrize("causal", [True, False])
def test_chunk_piece_is_the_same_in_every_chunk(name, S, W, chunk, causal):
    """Where ``chunk_piece`` gives ``(m, piece)``, the block is that piece in every run of m rows
    and keys, and nothing outside them."""
    layout = make_layout(name, S, W)
    rules = PositionRules(causal, chunk=chunk)
    n = layout.local_len
    found = 0
    for rank, src in itertools.product(range(W), repeat=2):
        q_pos, k_pos = layout.positions(rank), layout.positions(src)
        got = chunk_piece(layout_progression(layout, rank, src), rules, n, n, layout.seq_len)
        if got is None:
            continue
        found += 1
        m, piece = got
        want = torch.block_diag(*[_dense((piece,), m, m)] * (n // m))
        assert torch.equal(BlockMask(q_pos, k_pos, S, rules).allowed()[0], want), (rank, src)
    # a ring of one, and a striped ring whose chunks hold whole stripes: every block
    if (W == 1 or name == "striped") and chunk % W == 0 and S % chunk == 0 and chunk > W:
        assert found == W * W


def _with_batched_chunks(rank, world, layout_name, mask_kind, S):
    """``check_against_sdpa`` on the default kernels; also how many fused calls took a batch of
    chunks (more batch rows than the inputs' 2) on this rank."""
    from ringcompile.kernels import sdpa_blocks
    from tests.test_ring_attention import check_against_sdpa

    calls = []
    forward, backward = sdpa_blocks.CpuFlashBlocks.forward, sdpa_blocks.CpuFlashBlocks.backward

    def counted(fn):
        return lambda self, *a, **kw: calls.append(a[0].shape[0] > 2) or fn(self, *a, **kw)

    sdpa_blocks.CpuFlashBlocks.forward = counted(forward)
    sdpa_blocks.CpuFlashBlocks.backward = counted(backward)
    try:
        return check_against_sdpa(rank, world, layout_name, mask_kind, 8, 2, S, 3), sum(calls)
    finally:
        sdpa_blocks.CpuFlashBlocks.forward, sdpa_blocks.CpuFlashBlocks.backward = forward, backward


@pytest.mark.parametrize(
    "layout_name,world,mask_kind,batched",
    [
        # (an own block's backward at W >= 2 is two calls, on halves of the KV heads)
        ("striped", 1, "chunk_of_6", [2]),  # the forward and backward of the own block
        # rank 1's block from rank 0 too, and rank 0's from rank 1 (strictly causal in each chunk)
        ("striped", 2, "chunk_of_6", [5, 5]),
        ("striped", 3, "chunk_of_6_bidirectional", [7, 7, 7]),  # every block full squares
        # no chunk spans two ranks: one ring step (the own block, its backward one call)
        ("contiguous", 2, "chunk_of_6", [2, 2]),
        # rank 0 holds positions 0-5 and 18-23 (not one progression: masked kernels), rank 1
        # 6-17, one progression
        ("zigzag", 2, "chunk_of_6", [0, 2]),
        ("striped", 2, "chunk", [0, 0]),  # chunks of 5 cut stripes of 2
    ],
)  # fmt: skip
def test_chunked_blocks_run_as_one_batch_of_chunks(gloo, layout_name, world, mask_kind, batched):
    """A chunked block that is the same piece in every chunk runs as one fused call over a batch
    of chunks, exactly; the others on the masked kernels."""
    results = gloo(world).run(_with_batched_chunks, layout_name, mask_kind, 24)
    for rank, (errs, _) in enumerate(results):
        assert max(errs) < 1e-10, f"rank {rank}: rel errors (out, dq, dk, dv) = {errs}"
    assert [n for _, n in results] == batched
